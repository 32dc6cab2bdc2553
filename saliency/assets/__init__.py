"""Third-party files shipped inside the package (see NOTICE.md here), read with importlib.resources.

Every file is checked against its sha256 on read, so a truncated or swapped file is an error naming the
file, never a silently different model or dataset.
"""
from __future__ import annotations

import hashlib
from importlib import resources

#: file name → sha256 of its bytes (the values in NOTICE.md).
CHECKSUMS = {
    "cifar_resnet20.th": "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    "cifar10_test100.npz": "c90529dad37a82ec78d90109a95f532742fbedc3e8b7bbfcf9df590a4ad775c9",
}


def read_asset(name: str) -> bytes:
    """The bytes of a shipped file, after checking its sha256."""
    if name not in CHECKSUMS:
        raise ValueError(f"unknown asset {name!r}; shipped: {', '.join(CHECKSUMS)}")
    resource = resources.files(__name__) / name
    try:
        data = resource.read_bytes()
    except OSError as error:
        raise ValueError(f"shipped file {name} is missing from the installed package ({error}); "
                         "reinstall saliency-sanity") from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != CHECKSUMS[name]:
        raise ValueError(f"shipped file {name} is corrupt: sha256 {digest}, expected {CHECKSUMS[name]} "
                         "(see saliency/assets/NOTICE.md); reinstall saliency-sanity")
    return data


__all__ = ["CHECKSUMS", "read_asset"]

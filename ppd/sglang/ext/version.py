"""The one SGLang version the decode-side extension is validated against, and the loud check of it."""

from __future__ import annotations

from ppd.sglang.protocol import SGLANG_VERSION

SUPPORTED_SGLANG_VERSION = SGLANG_VERSION


class SGLangVersionError(RuntimeError):
    """SGLang is missing, or is not the version our patches were written and checked against."""


def check_sglang_version(found: str | None) -> None:
    """Raise unless `found` is exactly the supported version (no ranges: the patches replace private functions)."""
    if found is None:
        raise SGLangVersionError(
            f"sglang is not installed; ppd.sglang.ext needs sglang=={SUPPORTED_SGLANG_VERSION} "
            "(pip install 'p-pd[gpu]', or see docs/gpu.md for the bundle used on the lent H200 box)"
        )
    if found != SUPPORTED_SGLANG_VERSION:
        raise SGLangVersionError(
            f"sglang {found} is installed, but ppd.sglang.ext patches private functions of sglang "
            f"{SUPPORTED_SGLANG_VERSION} only; install sglang=={SUPPORTED_SGLANG_VERSION} or start the decode server "
            "without the extension (sglang.decode_local_append: false)"
        )


def installed_sglang_version() -> str | None:
    """`sglang.__version__` of the importable sglang, None if there is none."""
    try:
        import sglang
    except ImportError:
        return None
    return getattr(sglang, "__version__", "unknown")

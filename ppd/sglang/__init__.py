"""Everything SGLang-specific: protocol fields, the HTTP client, server command lines, our decode-side extension.

Pinned to one SGLang version; the emulator (ppd.emulator) speaks the same protocol and is tested against it.
"""

from ppd.sglang.protocol import SGLANG_VERSION

__all__ = ["SGLANG_VERSION"]

"""How a rank's CPU tensors get their memory: large ones on transparent huge pages.

A training step allocates and frees tensors of tens of megabytes many times (the
gradients of a double backward, a SOAP power spectrum). The C library gives such
blocks back to the kernel when they are freed, so every new one is first touched
page by page: one page fault per 4 KiB, which on a CPU cost more time than the
arithmetic that fills them (a batched product of a ``soap_bpnn`` step: 7 ms on
reused memory, 23 ms on fresh). PyTorch aligns tensors of 2 MiB or more to huge
pages and asks the kernel to back them with huge pages when ``THP_MEM_ALLOC_ENABLE``
is 1 (read once, at the first CPU allocation): 512 times fewer faults.

:func:`use_huge_pages` turns it on for this process and the processes it starts,
unless the environment already says (``THP_MEM_ALLOC_ENABLE=0`` turns it off).
"""

from __future__ import annotations

import os

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Large CPU tensors on transparent huge pages, unless ``THP_MEM_ALLOC_ENABLE`` is
    set already; call before the process's first tensor. Returns whether it is on."""
    return os.environ.setdefault(VARIABLE, "1") == "1"

"""Adding pyvmm's parameters to a Linux command line the user wrote.

The kernel hands everything after a lone `--` to init, so pyvmm's parameters
go before it. Parameters a machine or accelerator merely prefers are added
only when the user has not set a parameter of the same name, whatever its
value: the user's choice wins.
"""

from __future__ import annotations

import re


def split_init_args(cmdline: str) -> tuple[str, str]:
    """The kernel's part of a command line and the rest (`-- ...` for init, or "")."""
    end = re.search(r"(^|\s)--(\s|$)", cmdline)
    kernel_part = cmdline[:end.start()] if end else cmdline
    return kernel_part, cmdline[len(kernel_part):]


def param_name(param: str) -> str:
    return param.split("=", 1)[0]


def insert_kernel_params(cmdline: str, params: list[str]) -> str:
    """`params` appended to the kernel's part of `cmdline`."""
    kernel_part, init_part = split_init_args(cmdline)
    return " ".join([kernel_part.strip(), *params]).strip() + init_part


def add_unset_kernel_params(cmdline: str, params: list[str]) -> str:
    """Each of `params` whose name the kernel's part of `cmdline` does not set yet, appended to it."""
    names = {param_name(p) for p in split_init_args(cmdline)[0].split()}
    return insert_kernel_params(cmdline, [p for p in params if param_name(p) not in names])

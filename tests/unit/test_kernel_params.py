"""The parameters pyvmm adds to the user's Linux command line go before init's arguments, and
never override a parameter the user set."""

import pytest

from boot.kernel_params import add_unset_kernel_params, insert_kernel_params, split_init_args


@pytest.mark.parametrize(("cmdline", "expected"), [
    ("console=ttyS0", ("console=ttyS0", "")),
    ("console=ttyS0 -- init-arg", ("console=ttyS0", " -- init-arg")),
    ("-- init-arg", ("", "-- init-arg")),
    ("a--b c", ("a--b c", "")),
])
def test_the_kernel_part_ends_at_a_lone_double_dash(cmdline, expected):
    assert split_init_args(cmdline) == expected


def test_inserted_params_go_before_init_arguments():
    assert insert_kernel_params("quiet -- x=1", ["a=1", "a=2"]) == "quiet a=1 a=2 -- x=1"
    assert insert_kernel_params("", ["a=1"]) == "a=1"


def test_a_param_the_user_set_by_name_is_not_added_whatever_its_value():
    assert add_unset_kernel_params("mitigations=auto", ["mitigations=off"]) == "mitigations=auto"
    assert add_unset_kernel_params("noxsave", ["noxsave"]) == "noxsave"
    assert add_unset_kernel_params("quiet -- mitigations=auto", ["mitigations=off"]) == (
        "quiet mitigations=off -- mitigations=auto")


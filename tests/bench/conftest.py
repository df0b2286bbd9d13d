from tests.assets import linux_assets, linux_module_tree  # noqa: F401 - fixtures: the benchmarks boot the test kernel

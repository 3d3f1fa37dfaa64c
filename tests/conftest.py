import pytest
from host import import_host, register_tiny_models  # tests/ is on sys.path through pytest's rootdir conftest

import_host()


def pytest_report_header(config):
    import comfyui_version
    from host import COMFYUI_PATH, HOST_NAME

    return f"Motion Dials host {HOST_NAME}: ComfyUI {comfyui_version.__version__} at {COMFYUI_PATH}"


@pytest.fixture(scope="session")
def tiny_models():
    from host import TINY_MODELS

    if not (TINY_MODELS / "manifest.json").exists():
        pytest.fail(f"Tiny models missing at {TINY_MODELS}: run `make setup` (or `make test`, which does it).")
    register_tiny_models()
    return TINY_MODELS

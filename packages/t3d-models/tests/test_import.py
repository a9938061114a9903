import t3d_models


def test_import_and_version():
    assert t3d_models.__version__ == "0.1.0"

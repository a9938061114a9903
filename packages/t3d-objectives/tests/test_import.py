import t3d_objectives


def test_import_and_version():
    assert t3d_objectives.__version__ == "0.1.0"

import t3d_eval


def test_import_and_version():
    assert t3d_eval.__version__ == "0.1.0"

import t3d_data


def test_import_and_version():
    assert t3d_data.__version__ == "0.1.0"

import pytest
from t3d_data import ReportError, load_report, normalise_report, report_group_ids


def test_normalise_keeps_sections_collapses_spaces():
    raw = "\ufeffFINDINGS:\t  Clear   lungs. \r\n\r\n\r\n\r\nIMPRESSION:\u00a0 No  acute findings.  \n"
    assert normalise_report(raw) == "FINDINGS: Clear lungs.\n\nIMPRESSION: No acute findings."
    assert normalise_report("a\nb") == "a\nb"


def test_non_utf8_report_replaced_and_counted(tmp_path):
    (tmp_path / "r.txt").write_bytes(b"Hallazgos: derrame pleural " + b"\xe9\xff y n\xf3dulo.")
    rep = load_report("r.txt", tmp_path)
    assert rep.replaced_bytes == 3
    assert rep.text == "Hallazgos: derrame pleural \ufffd\ufffd y n\ufffddulo."
    ok = load_report("Hallazgos: ñ ok", tmp_path)
    assert ok.replaced_bytes == 0 and ok.text == "Hallazgos: ñ ok"


def test_empty_and_missing_reports_raise(tmp_path):
    (tmp_path / "e.txt").write_bytes(b" \n\t\r\n")
    with pytest.raises(ReportError, match="empty text"):
        load_report("e.txt", tmp_path)
    with pytest.raises(ReportError, match="empty text"):
        load_report("  \n ", tmp_path)
    with pytest.raises(ReportError, match="cannot read report file"):
        load_report("missing.txt", tmp_path)


def test_report_groups_in_order_of_first_appearance():
    assert report_group_ids(["No acute findings.", "Nodule", " No  acute findings.", "x", "Nodule"]) == [0, 1, 0, 2, 1]

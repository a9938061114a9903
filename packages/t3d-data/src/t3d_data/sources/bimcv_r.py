"""BIMCV-R (Chen et al. 2024, ``cyd0806/BIMCV-R`` on the Hugging Face hub): 8,069 chest CT
volumes of the BIMCV (Valencia) collection with their Spanish reports and English translations.

Layout read (as the dataset authors' own MedFinder loader reads it)::

    CT<n>/ct/<volume>.nii.gz                      volumes, in numbered archive folders
    meta/*.csv                                    columns ``path`` (the volume, matched by file
                                                  name) and report columns: ``Report_en``
                                                  (English), ``Report_es`` or ``Report``
                                                  (Spanish, the original)

What the importer gets right (docs/datasets.md):

- **language**: ``language="es"`` (default) takes the Spanish report; the English translation
  is kept in ``meta["translations"]["en"]``; ``language="en"`` takes the English one (the
  Spanish text, when present, goes to ``meta["translations"]["es"]``). Encode Spanish reports
  with a multilingual text encoder (``t3d_models`` preset ``multilingual-e5-base`` or
  ``mbert``; docs/datasets.md);
- **ids**: BIMCV file names are BIDS names, ``sub-S03047_ses-E06170_run-1_bp-chest_ct.nii.gz``:
  patient ``sub-S03047``, study ``sub-S03047_ses-E06170_run-1`` (a name of another form is its
  own patient, counted in the notes);
- **splits**: BIMCV-R publishes no split; a seeded, patient-level 80/10/10 train/val/test split
  is drawn (:func:`t3d_data.patient_split`), so no patient crosses splits.
"""

from __future__ import annotations

import re
from pathlib import Path

from t3d_data.sources.base import BadRow, ImportError_, ImportResult, read_csv_rows
from t3d_data.sources.splits import assign_patient_splits

__all__ = ["import_bimcv_r", "parse_bids_name"]

_SPANISH = ("Report_es", "Report")
_ENGLISH = ("Report_en",)
_BIDS = re.compile(r"(sub-[A-Za-z0-9]+)_(ses-[A-Za-z0-9]+)(?:_(run-[0-9]+))?.*?\.nii(?:\.gz)?")


def parse_bids_name(name: str) -> tuple[str, str] | None:
    """``(patient_id, study_id)`` of a BIDS volume name, or ``None``.

    >>> parse_bids_name("sub-S03047_ses-E06170_run-1_bp-chest_ct.nii.gz")
    ('sub-S03047', 'sub-S03047_ses-E06170_run-1')
    """
    m = _BIDS.fullmatch(name)
    if m is None:
        return None
    sub, ses, run = m.groups()
    return sub, "_".join(p for p in (sub, ses, run) if p)


def _strip(name: str) -> str:
    return name[:-7] if name.endswith(".nii.gz") else name.rsplit(".", 1)[0]


def import_bimcv_r(root: str | Path, *, language: str = "es", seed: int = 0) -> ImportResult:
    """Imports a BIMCV-R download folder (see the module docstring).

    Args:
        root: the folder holding ``meta/`` and the ``CT*/`` volume folders.
        language: ``"es"`` (the original Spanish reports) or ``"en"`` (the translations).
        seed: seed of the patient-level split.

    Raises:
        ImportError_: no ``meta/*.csv`` with a ``path`` column, or no report column of the
            language asked for (naming the columns found and the ``--language`` fix).
    """
    if language not in ("es", "en"):
        raise ValueError(f"--language must be 'es' or 'en' for BIMCV-R, got {language!r}")
    root = Path(root)
    tables = sorted((root / "meta").glob("*.csv")) if (root / "meta").is_dir() else []
    if not tables:
        raise ImportError_(f"{root}: no meta/*.csv; give the BIMCV-R download folder (holding "
                           "meta/ and the CT*/ volume folders)")
    volumes = {p.name: p for p in sorted(root.glob("CT*/ct/*.nii*"))}
    result = ImportResult("bimcv-r")
    texts: dict[str, dict[str, str]] = {}  # volume name -> language -> text
    seen_columns: set[str] = set()
    where: dict[str, tuple[Path, int]] = {}
    for table in tables:
        rows = list(read_csv_rows(table, ("path",)))
        for line, row in rows:
            seen_columns.update(row)
            name = Path(row["path"].replace("\\", "/")).name
            if not name:
                result.bad.append(BadRow(table, line, "empty 'path'"))
                continue
            where.setdefault(name, (table, line))
            for lang, columns in (("es", _SPANISH), ("en", _ENGLISH)):
                for column in columns:
                    if row.get(column):
                        texts.setdefault(name, {})[lang] = row[column]
    wanted = _SPANISH if language == "es" else _ENGLISH
    if not any(c in seen_columns for c in wanted):
        other = "en" if language == "es" else "es"
        raise ImportError_(f"{root / 'meta'}: no {' or '.join(wanted)} column (columns found: "
                           f"{', '.join(sorted(seen_columns))}); import with --language "
                           f"{other}, or add the {language} reports")
    not_bids = 0
    for name in sorted(texts):
        table, line = where[name]
        by_lang = texts[name]
        if language not in by_lang:
            result.bad.append(BadRow(table, line, f"{name}: no {language} report"))
            continue
        image = volumes.get(name)
        if image is None:
            result.missing.append(BadRow(root / "CT*" / "ct" / name, None, "volume not on disk"))
            continue
        ids = parse_bids_name(name)
        if ids is None:
            not_bids += 1
            ids = (_strip(name), _strip(name))
        translations = {k: v for k, v in by_lang.items() if k != language}
        result.rows.append({"study_id": ids[1], "patient_id": ids[0],
                            "image": str(image.resolve()), "report": by_lang[language],
                            "modality": "CT", "language": language,
                            "meta": {"translations": translations, "volume_name": name}})
    if not_bids:
        result.notes.append(f"{not_bids} volume names are not BIDS names; each is its own "
                            "patient")
    assign_patient_splits(result.rows, {"train": 0.8, "val": 0.1, "test": 0.1}, seed)
    result.notes.append(f"no official split: patient-level 80/10/10 train/val/test, seed {seed}")
    return result

from pipeline.layouts import DIT_FILE, LayoutKind
from pipeline.manifest import MANIFEST_NAME, verify_manifest, write_manifest


def test_tiny_model_matches_its_manifest(tiny_models):
    for root in tiny_models.values():
        assert verify_manifest(root) == []


def test_each_kind_of_damage_is_reported_per_file(tiny_copy):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    (root / "vae" / "config.json").unlink()
    with (root / DIT_FILE).open("r+b") as handle:
        handle.truncate(100)
    tokenizer = root / "tokenizer" / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes().replace(b"a", b"b", 1))
    problems = verify_manifest(root)
    assert len(problems) == 3
    assert any(str(root / "vae" / "config.json") in p and "missing" in p for p in problems)
    assert any(str(root / DIT_FILE) in p and "truncated" in p for p in problems)
    assert any(str(tokenizer) in p and "sha256 differs" in p for p in problems)


def test_missing_manifest_says_how_to_write_one(tiny_copy):
    root = tiny_copy(LayoutKind.DIFFUSERS)
    (root / MANIFEST_NAME).unlink()
    [problem] = verify_manifest(root)
    assert "--write-manifest" in problem


def test_written_manifest_lists_every_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.json").write_text("{}")
    write_manifest(tmp_path, "single-file")
    assert verify_manifest(tmp_path) == []
    (tmp_path / "b.json").write_text("{} ")
    assert len(verify_manifest(tmp_path)) == 1

"""ops/sizes.py: the size budget's measure."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.sizes import main, measure, report


def test_classes_and_functions_count_from_their_first_decorator_to_their_last_line(
    tmp_path: Path,
) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import functools\n\n\nclass A:\n    @functools.cache\n    def f(self) -> int:\n"
        "        return 1\n\n\ndef g() -> None:\n    pass\n"
    )
    sizes = {(s.kind, s.where.split(" ")[-1]): s.lines for s in measure([tmp_path])}
    assert sizes == {
        ("module", str(module)): 11,
        ("class", "A"): 4,
        ("function", "f"): 3,
        ("function", "g"): 2,
    }


def test_over_lists_only_what_is_over_the_budget(tmp_path: Path) -> None:
    (tmp_path / "big.py").write_text("def f() -> None:\n" + "    x = 1\n" * 90)
    (tmp_path / "small.py").write_text("x = 1\n")
    lines = report(measure([tmp_path]), top=10, over=True)
    assert lines[0] == "## modules over ~600"
    assert [line for line in lines if not line.startswith("##")] == [
        f"{91:6d}  {tmp_path / 'big.py'}:1 f"
    ]


def test_a_missing_path_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "nope")])
    assert exit_.value.code == 2
    assert "no such file or directory" in capsys.readouterr().err

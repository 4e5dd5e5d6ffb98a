"""The shared argument system (delulu_hf.cli): flags from dataclasses, YAML configs, one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal, Optional

import pytest

from delulu_hf.cli import ArgumentParser, UserError, main_entry, require_path, suggest


@dataclasses.dataclass
class Options:
    output_dir: str = dataclasses.field(default="runs/demo", metadata={"help": "where results go"})
    max_steps: int = 1000
    learning_rate: float = 5e-4
    adam_betas: tuple[float, float] = (0.9, 0.98)
    resume_from_checkpoint: Optional[str] = "latest"
    max_train_items: Optional[int] = None
    bf16: bool = False
    normalize_audio: bool = True
    on_error: Literal["raise", "skip"] = "raise"
    model: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def parse(argv, **kwargs) -> Options:
    return ArgumentParser(Options, prog="prog.py", **kwargs).parse_one(argv)


def test_defaults_and_typed_values():
    assert parse([]) == Options()
    got = parse(
        ["--max_steps", "5", "--learning_rate", "1e-3", "--adam_betas", "0.8", "0.9", "--bf16"]
        + ["--no_normalize_audio", "--max_train_items", "none", "--resume_from_checkpoint", "null"]
    )
    assert (got.max_steps, got.learning_rate, tuple(got.adam_betas)) == (5, 1e-3, (0.8, 0.9))
    assert got.bf16 is True and got.normalize_audio is False
    assert got.max_train_items is None and got.resume_from_checkpoint is None
    assert parse(["--max_steps=7", "--on_error=skip"]).max_steps == 7


def test_old_list_syntax_and_mapping_fields():
    assert tuple(parse(["--adam_betas", "[0.5, 0.6]"]).adam_betas) == (0.5, 0.6)
    got = parse(["--model", "{hidden_size: 64, num_hidden_layers: 2}", "--model.hidden_size", "32"])
    assert got.model == {"hidden_size": 32, "num_hidden_layers": 2}
    assert parse(["--model.layerdrop=0.0"]).model == {"layerdrop": 0.0}


def test_hyphenated_spellings_still_work_with_a_warning(capsys):
    got = parse(["--max-steps", "3", "--on-error", "skip", "--model.hidden-size", "8"])
    assert (got.max_steps, got.on_error, got.model) == (3, "skip", {"hidden_size": 8})
    err = capsys.readouterr().err
    assert "--max-steps is deprecated, use --max_steps" in err
    assert "--on-error is deprecated, use --on_error" in err


def test_renamed_flags():
    parser = ArgumentParser(Options, prog="prog.py", renamed={"--steps": "--max_steps"})
    assert parser.parse_one(["--steps", "4"]).max_steps == 4


def test_yaml_config_sets_defaults_and_flags_override(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 20\nmodel: {hidden_size: 16}\nadam_betas: [0.1, 0.2]\n")
    got = parse(["--config", str(config), "--learning_rate", "0.1", "--model.num_hidden_layers", "1"])
    assert (got.max_steps, got.learning_rate, tuple(got.adam_betas)) == (20, 0.1, (0.1, 0.2))
    assert got.model == {"hidden_size": 16, "num_hidden_layers": 1}
    assert parse(["--max_steps", "2"], default_config=str(config)).max_steps == 2
    assert parse([], default_config=str(config)).max_steps == 20


def test_explicit_records_what_the_person_set(tmp_path: Path):
    default = tmp_path / "default.yaml"
    default.write_text("max_steps: 20\nmodel: {hidden_size: 16}\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("learning_rate: 0.1\nmodel: {num_hidden_layers: 3}\n")
    parser = ArgumentParser(Options, prog="prog.py", default_config=str(default))
    parser.parse_one(["--max_steps", "2", "--model.final_dim", "8"])
    assert parser.explicit == {"max_steps": "on the command line", "model.final_dim": "on the command line"}
    parser.parse_one(["--config", str(mine), "--bf16"])
    assert parser.explicit == {
        "learning_rate": f"in {mine}",
        "model.num_hidden_layers": f"in {mine}",
        "bf16": "on the command line",
    }


def test_help_lists_the_default_configs_values(tmp_path: Path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 321\n")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"], default_config=str(config))
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--max_steps" in out and "(default: 321)" in out
    assert "--max-steps" not in out  # only the current spelling is listed
    assert "where results go" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_steps", "abc"], "argument --max_steps: invalid int value: 'abc'"),
        (["--max_steps", "-1"], "max_steps must be >= 1, got -1"),
        (["--learning_rat", "1e-3"], "unknown option --learning_rat (did you mean --learning_rate?)"),
        (["--on_error", "ignore"], "invalid choice"),
        (["stray"], "unexpected argument 'stray'"),
        (["--model", "[1, 2]"], "--model needs a mapping"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prog.py: error: ") and message in err[0], err


def test_a_misspelled_required_flag_is_named_not_reported_missing(capsys):
    @dataclasses.dataclass
    class Required:
        repo_id: str = dataclasses.field(metadata={"help": "ORG/NAME"})

    parser = ArgumentParser(Required, prog="push.py")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_one(["--repo_idd", "a/b"])
    assert exit_info.value.code == 2
    assert "unknown option --repo_idd (did you mean --repo_id?)" in capsys.readouterr().err
    line = next(line for line in parser.format_help().splitlines() if line.strip().startswith("--repo_id"))
    assert "ORG/NAME" in line and "default" not in line


def test_config_file_errors(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    for argv in (["--config", str(bad)], ["--config", str(tmp_path / "missing.yaml")]):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option 'max_stepz' (did you mean max_steps?)" in err
    assert "missing.yaml: no such file" in err


def test_only_rank_zero_prints_argument_errors(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        parse(["--max_steps", "abc"])
    assert capsys.readouterr().err == ""


def test_suggest_and_require_path(tmp_path: Path):
    assert suggest("--learning_rat", ["--learning_rate", "--max_steps"]) == " (did you mean --learning_rate?)"
    assert suggest("--zzz", ["--learning_rate"]) == ""
    require_path(tmp_path, "--data", "dir")
    with pytest.raises(UserError, match="--data .*no_such_dir: no such folder"):
        require_path(tmp_path / "no_such_dir", "--data", "dir")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        require_path(tmp_path / "f.txt", "--data", "dir")


def test_main_entry_turns_user_errors_into_one_line_and_keeps_program_errors(tmp_path: Path):
    script = tmp_path / "tool.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from delulu_hf.cli import UserError, main_entry

            def main():
                if sys.argv[1] == "user":
                    raise UserError("corrupt.flac: not an audio file (use --on_error skip)")
                if sys.argv[1] == "bug":
                    raise KeyError("program error")
                return 0

            main_entry(main)
            """
        )
    )
    run = lambda what: subprocess.run([sys.executable, str(script), what], capture_output=True, text=True)  # noqa: E731
    user = run("user")
    assert user.returncode == 2
    assert user.stderr.strip() == "tool.py: error: corrupt.flac: not an audio file (use --on_error skip)"
    bug = run("bug")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError" in bug.stderr
    assert run("ok").returncode == 0


def test_main_entry_returns_the_exit_code():
    with pytest.raises(SystemExit) as exit_info:
        main_entry(lambda: 3)
    assert exit_info.value.code == 3

"""The README's commands work as written.

Every ``python -m shard_tools|retrieval|trainer`` line (also behind ``accelerate launch``)
in every shell block parses against the real argument parser; the blocks marked
``<!-- runnable -->`` are run, in order, in a scratch folder.
"""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from conftest import PYTHON, REPO, run_env

README = REPO / "README.md"
FENCE = re.compile(r"(<!-- runnable -->\s*\n)?```bash\n(.*?)```", re.S)


def shell_blocks() -> list[tuple[bool, list[str]]]:
    """(runnable, command lines) per ```bash block; continuation lines joined, comments dropped."""
    out = []
    for m in FENCE.finditer(README.read_text()):
        lines, current = [], ""
        for raw in m.group(2).splitlines():
            line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if not line.strip():
                continue
            current = f"{current} {line.strip()}" if current else line.strip()
            if current.endswith("\\"):
                current = current[:-1].rstrip()
                continue
            lines.append(current)
            current = ""
        out.append((bool(m.group(1)), lines))
    return out


def module_argv(line: str) -> tuple[str, list[str]] | None:
    """``(module, argv)`` of a README line that runs one of our modules, else None."""
    words = shlex.split(line)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):      # VAR=value prefixes
        words = words[1:]
    if "-m" not in words:
        return None
    i = words.index("-m")
    if words[0] not in ("python", "accelerate") or i + 1 >= len(words):
        return None
    module = words[i + 1]
    if module not in ("shard_tools", "retrieval", "trainer"):
        return None
    return module, words[i + 2:]


def parse_only(module: str, argv: list[str]) -> None:
    """Parse ``argv`` with the command's real parser (SystemExit on a bad command line)."""
    argv = [a for a in argv if "$" not in a] if any("$" in a for a in argv) else argv
    if module == "shard_tools":
        from shard_tools.__main__ import build_parser
        build_parser().parse_args(argv)
    elif module == "retrieval":
        from retrieval.__main__ import build_parser
        build_parser().parse_args(argv)
    elif argv and argv[0] == "inspect-data":
        from trainer.__main__ import _inspect_parser
        _inspect_parser().parse_args(argv[1:])
    elif argv and argv[0] == "demo":
        from trainer.demo import _parser
        _parser().parse_args(argv[1:])
    else:
        from trainer.train import _parser
        _parser().parse_intermixed_args(argv[1:] if argv and argv[0] == "train" else argv)


def test_readme_has_commands_and_runnable_blocks():
    blocks = shell_blocks()
    assert sum(len(lines) for _, lines in blocks) > 40
    assert any(runnable for runnable, _ in blocks)


@pytest.mark.parametrize("line", [line for _, lines in shell_blocks() for line in lines
                                  if module_argv(line)])
def test_every_readme_command_parses(line):
    module, argv = module_argv(line)
    try:
        parse_only(module, argv)
    except SystemExit as exc:
        pytest.fail(f"README command does not parse ({exc.code}): {line}")


@pytest.mark.slow
def test_runnable_blocks_run_as_written(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = run_env()
    env.update(TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    ran = 0
    for runnable, lines in shell_blocks():
        if not runnable:
            continue
        for line in lines:
            words = shlex.split(line)
            if words[0] == "python":
                words[0] = PYTHON
            proc = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            ran += 1
    assert ran >= 5

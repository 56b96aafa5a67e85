"""What the setup guide and `--help` tell an operator about `ratesync` is what it does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_cli import console, ratesync, write_config

GUIDE = Path(__file__).parent.parent / "docs" / "setup" / "nats-setup.md"
README = Path(__file__).parent.parent / "README.md"
STEP = re.compile(r"^  (ok  |WARN|FAIL)  (.{24}) (.*)$")


def sample_check_output() -> list[tuple[str, str]]:
    """The guide's sample `ratesync check` output: (step, detail) per line."""
    section = GUIDE.read_text().split("## Verify everything at once", 1)[1]
    block = section.split("```\n", 2)[2].split("```", 1)[0]  # the block after the ```bash one
    return [
        (match.group(2).strip(), match.group(3))
        for line in block.splitlines()
        if (match := STEP.match(line))
    ]


@pytest.mark.nats
def test_the_guides_sample_check_output_is_what_check_prints(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    sample = sample_check_output()
    assert len(sample) >= 8
    status, output = ratesync("check", "--config", write_config(tmp_path, nats_url, bucket_name))
    assert status == 0, output
    printed = [
        (match.group(2).strip(), match.group(3))
        for line in output.splitlines()
        if (match := STEP.match(line))
    ]
    assert [step for step, _ in printed] == [step for step, _ in sample]
    # The first run creates the buckets, as the sample says.
    details = dict(printed)
    assert details["bucket creatable"] == f"{bucket_name} created (auto_create = true)"
    assert dict(sample)["bucket creatable"] == "rate_limits created (auto_create = true)"
    assert details["rules bucket"] == f"{bucket_name}_rules created (auto_create = true)"


def test_help_and_the_guide_list_the_same_exit_statuses() -> None:
    result = console("--help")
    assert result.returncode == 0
    listed = dict(re.findall(r"^  ([0-3])  (.+)$", result.stdout, re.MULTILINE))
    assert sorted(listed) == ["0", "1", "2", "3"]
    table = dict(re.findall(r"^\| ([0-3]) \| (.+) \|$", GUIDE.read_text(), re.MULTILINE))
    assert sorted(table) == ["0", "1", "2", "3"]
    assert "unreachable or refused" in listed["3"]


def test_the_readmes_synopsis_names_every_command() -> None:
    synopsis = README.read_text().split("the operator's command", 1)[1].split("Exit status", 1)[0]
    named = set(re.findall(r"ratesync ([a-z|]+)", synopsis))
    commands = {word for group in named for word in group.split("|")}
    commands |= set(re.findall(r"\| ([a-z]+)", synopsis))
    result = console("--help")
    offered = set(re.search(r"\{([a-z,]+)\}", result.stdout).group(1).split(","))  # type: ignore[union-attr]
    assert offered <= commands, offered - commands

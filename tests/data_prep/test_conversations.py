"""Conversations: ShareGPT ({from, value}) and OpenAI ({role, content}) rows; every assistant
turn learned by default (one row per turn, the turns before it as context without loss), the
last only as a choice; malformed turns named."""

from __future__ import annotations

import json
import re

import pytest
from helpers import tiny_model_dir, write_jsonl
from transformers import AutoTokenizer

from data_prep.config import LabelConfig, PrepConfig, SourceConfig
from data_prep.run import prepare
from data_prep.shards import read_split

SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "You count."},
            {"from": "human", "value": f"Count from {i}."},
            {"from": "gpt", "value": f"{i} {i + 1} {i + 2}"},
            {"from": "human", "value": "Again, higher."},
            {"from": "gpt", "value": f"{i + 10} {i + 11} {i + 12} {i + 13}"},
            {"from": "human", "value": "Once more."},
            {"from": "gpt", "value": f"{i + 20}"},
        ]
    }
    for i in range(30)
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("conv") / "model", layers=1)


def _prep(model, tmp_path, rows, **source):
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    return prepare(
        PrepConfig(
            model=str(model),
            sources=[SourceConfig(path=str(data), messages_field="conversations", **source)],
            output_root=str(tmp_path / "prep"),
            heldout_fraction=0.2,
            shard_rows=16,
            label=LabelConfig(strategy="fixed", fixed_k=2),
        )
    )


def test_every_assistant_turn_of_a_sharegpt_conversation_is_learned(model, tmp_path):
    folder = _prep(model, tmp_path, SHAREGPT)
    manifest = json.loads((folder / "manifest.json").read_text())
    source = next(iter(manifest["sources"].values()))
    assert source["conversations"] == 30 and source["turns"] == 90 and manifest["turns_learned"] == 90
    tok = AutoTokenizer.from_pretrained(str(model))
    rows = read_split(folder, "train").to_pylist() + read_split(folder, "eval").to_pylist()
    assert len(rows) == 90
    by_conversation: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        prompt = tok.decode(r["input_ids"][: r["prompt_len"]])
        response = tok.decode(r["input_ids"][r["prompt_len"] :], skip_special_tokens=True)
        start = int(re.search(r"Count from (\d+)", prompt).group(1))
        by_conversation.setdefault(start, []).append((prompt, response.strip()))
    for i, turns in by_conversation.items():
        assert len(turns) == 3  # the split keeps a conversation's turns together
        learned = sorted(resp for _, resp in turns)
        assert learned == sorted(
            [f"{i} {i + 1} {i + 2}", f"{i + 10} {i + 11} {i + 12} {i + 13}", f"{i + 20}"]
        )
        last = next(p for p, resp in turns if resp == f"{i + 20}")
        # the loss mask: earlier answers are context (in the prompt), not response tokens
        assert f"{i} {i + 1} {i + 2}" in last and "Again, higher." in last and "Once more." in last
        assert "You count." in last


def test_label_view_shows_which_turn_each_row_learns(model, tmp_path, capsys):
    from data_prep.view import main as view_main

    folder = _prep(model, tmp_path, SHAREGPT)
    html = tmp_path / "view.html"
    view_main([str(folder), "--n", "90", "--html", str(html)])
    out = capsys.readouterr().out
    shown = re.findall(r"chats\.jsonl:(\d+), assistant turn (\d) of 3\)", out)
    assert len(shown) == len(read_split(folder, "train"))
    by_row: dict[str, set[str]] = {}
    for row, turn in shown:
        by_row.setdefault(row, set()).add(turn)
    assert all(turns == {"1", "2", "3"} for turns in by_row.values())
    assert "assistant turn 2 of 3" in html.read_text()


def test_turns_last_learns_only_the_final_answer(model, tmp_path, capsys):
    from data_prep.view import main as view_main

    folder = _prep(model, tmp_path, SHAREGPT, turns="last")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows_out"] == 30 and manifest["turns_learned"] == 30
    view_main([str(folder), "--n", "3"])
    assert capsys.readouterr().out.count("assistant turn 3 of 3") == 3


def test_openai_messages_rows_learn_every_turn_too(model, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}"},
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]
        }
        for i in range(20)
    ]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    folder = prepare(
        PrepConfig(
            model=str(model),
            sources=[SourceConfig(path=str(data), messages_field="messages")],
            output_root=str(tmp_path / "prep"),
            heldout_fraction=0.2,
            shard_rows=16,
            label=LabelConfig(strategy="fixed", fixed_k=2),
        )
    )
    assert json.loads((folder / "manifest.json").read_text())["rows_out"] == 40


@pytest.mark.parametrize(
    "turns, fragment",
    [
        ([{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}], "[1]: unknown role 'robot'"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt"}], "[1] needs a role and string content"),
        (
            [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}],
            "[1] (an assistant turn) is empty",
        ),
        ([{"from": "human", "value": "hi"}], "no assistant turn to learn"),
        (
            [{"from": "gpt", "value": "x"}, {"from": "human", "value": "hi"}],
            "the last turn must be the assistant's",
        ),
        ("not a list", "must be a non-empty list of turns"),
    ],
)
def test_a_malformed_conversation_is_named_by_file_row_and_turn(tmp_path, turns, fragment):
    from data_prep.sources import DataError, index_source

    data = write_jsonl(tmp_path / "bad.jsonl", [SHAREGPT[0], {"conversations": turns}])
    with pytest.raises(
        DataError, match=re.escape("bad.jsonl: row 2: field 'conversations'") + ".*" + re.escape(fragment)
    ):
        index_source(SourceConfig(path=str(data), messages_field="conversations"))


def test_turns_setting_is_checked():
    from hamburger.configio import load_config

    with pytest.raises(ValueError, match="turns must be all or last"):
        load_config(PrepConfig, None, ["sources=[{path: x.jsonl, messages_field: c, turns: first}]"])

"""LongConvQA (LoCoMo, REALTALK, LongMemEval): EpiCache's F1 on hand-computed cases, loaders on fixture files in the
authors' formats, EpiCache's renderings, the offline message, and a query-agnostic run with per-category scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kvbench.metrics import score_prediction
from kvbench.runner import run
from kvbench.tasks import load_samples
from kvbench.tasks import longconvqa as lc
from kvbench.tasks.hub import DataMissingError

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize(("pred", "ref", "f1"), [
    ("7 May 2023", "7 May 2023", 1.0),
    ("Two dogs and a cat", "2 dogs", 2 * 0.5 * 1.0 / 1.5),  # "a" dropped, two -> 2: [2 dogs and cat] vs [2 dogs]
    ("The Sweden.", "sweden", 1.0),
    ("pottery, camping", "pottery, camping, painting, swimming", 2 * 1.0 * 0.5 / 1.5),
    ("nothing", "2022", 0.0),
    ("", "Sweden", 0.0),
])
def test_conv_f1_as_epicache(pred, ref, f1) -> None:
    assert score_prediction(pred, [ref], ["conv_f1"])["conv_f1"] == pytest.approx(f1)


# ------------------------------------------------------------------------------------------------ fixtures


def locomo_item(i: int) -> dict:
    conv = {"speaker_a": "Caroline", "speaker_b": "Melanie",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [{"speaker": "Caroline", "dia_id": "D1:1", "text": "I went to a support group yesterday."},
                          {"speaker": "Melanie", "dia_id": "D1:2", "text": "That's great!",
                           "img_url": ["https://example.invalid/a.jpg"], "blip_caption": "a photo of a sunset"}],
            "session_2_date_time": "1:14 pm on 25 May, 2023",
            "session_2": [{"speaker": "Melanie", "dia_id": "D2:1", "text": f"I ran a charity race {i}."}]}
    qa = [{"question": "When did Caroline go to the support group?", "answer": "7 May 2023", "evidence": ["D1:1"],
           "category": 2},
          {"question": "When did Melanie paint a sunrise?", "answer": 2022, "evidence": ["D1:12"], "category": 2},
          {"question": "What did Melanie run?", "answer": "charity race", "evidence": ["D2:1"], "category": 4},
          {"question": "What is Caroline's identity?", "answer": "Transgender woman", "evidence": ["D1:5"],
           "category": 1},
          {"question": "Would Melanie like pottery?", "answer": "Likely yes", "evidence": [], "category": 3},
          {"question": "What did Caroline's dog race?", "adversarial_answer": "charity race", "evidence": ["D2:1"],
           "category": 5}]
    return {"sample_id": f"conv-{26 + i}", "qa": qa, "conversation": conv,
            "event_summary": {"events_session_1": {"Caroline": [], "Melanie": [], "date": "8 May, 2023"}},
            "observation": {}, "session_summary": {}}


def realtalk_chat(i: int) -> dict:
    turn = {"clean_text": f"Hey! How are you {i}?", "speaker": "Emi", "date_time": "29.12.2023, 22:42:04",
            "img_file": [], "img_url": [], "dia_id": "D1:1"}
    photo = {"clean_text": "Look!", "speaker": "Elise", "date_time": "30.12.2023, 00:32:20", "img_file": ["x.jpg"],
             "img_url": ["u"], "blip_caption": "a dog on a beach", "dia_id": "D1:2"}
    return {"name": {"speaker_1": "Emi", "speaker_2": "Elise"}, "session_1": [turn, photo],
            "events_session_1": {"Emi": [], "Elise": []}, "session_1_date_time": "29.12.2023, 22:42:04",
            "qa": [{"question": "What are Emi's hobbies?", "answer": "Cooking, skiing", "evidence": ["D1:1"],
                    "category": 1},
                   {"question": "Where does Elise live?", "answer": "Miami", "evidence": ["D1:2"], "category": 3}]}


def longmemeval_items() -> list[dict]:
    sessions = [[{"role": "user", "content": "I bought a red bike today.", "has_answer": True},
                 {"role": "assistant", "content": "Nice choice!"}],
                [{"role": "user", "content": "Recommend a movie."}, {"role": "assistant", "content": "Heat."}]]
    base = {"question_date": "2023/05/30 (Tue) 23:40", "haystack_session_ids": ["s_1", "s_2"],
            "haystack_dates": ["2023/05/20 (Sat) 02:21", "2023/05/21 (Sun) 10:00"], "haystack_sessions": sessions,
            "answer_session_ids": ["s_1"]}
    return [{**base, "question_id": "e47becba", "question_type": "single-session-user",
             "question": "What color is my bike?", "answer": "red"},
            {**base, "question_id": "gpt4_2655b836_abs", "question_type": "temporal-reasoning",
             "question": "When did I buy a car?", "answer": "You did not mention buying a car."}]


@pytest.fixture()
def data(tmp_path) -> Path:
    (tmp_path / "locomo10.json").write_text(json.dumps([locomo_item(0), locomo_item(1)]))
    (tmp_path / "realtalk").mkdir()
    for i, name in [(1, "Chat_1_Emi_Elise"), (10, "Chat_10_Fahim_Muhhamed")]:
        (tmp_path / "realtalk" / f"{name}.json").write_text(json.dumps(realtalk_chat(i)))
    (tmp_path / "longmemeval_s_cleaned.json").write_text(json.dumps(longmemeval_items()))
    return tmp_path


def test_locomo_conversations_questions_and_categories(data) -> None:
    samples = lc.load_locomo(str(data))
    assert [s.id for s in samples] == ["conv-26", "conv-27"]
    s = samples[0]
    assert [q.id for q in s.questions] == ["q0", "q1", "q2", "q3", "q4"], "adversarial (category 5) is dropped"
    assert [q.meta["category"] for q in s.questions] == ["temporal", "temporal", "single_hop", "multi_hop",
                                                         "open_domain"]
    assert s.questions[1].answers == ["2022"], "integer answers become strings"
    assert s.questions[0].text == (
        "\nBased on the above conversations, write a short answer for the following question in a few words. Do not "
        "write complete and lengthy sentences. Answer with exact words from the conversations whenever possible.\n\n"
        "Question: When did Caroline go to the support group? Use DATE of CONVERSATION to answer with an approximate "
        "date.\n")
    assert s.questions[2].text.endswith("Question: What did Melanie run?\n")
    assert s.context == (
        "Below is a conversation between two people: Caroline and Melanie. The conversation takes place over multiple "
        "days and the date of each conversation is written at the beginning of the conversation.\n\n"
        "\nDATE: 1:56 pm on 8 May, 2023\nCONVERSATION:\n"
        'Caroline said, "I went to a support group yesterday."\n\n'
        'Melanie said, "That\'s great!"\n and shared a photo of a sunset.\n'
        "\nDATE: 1:14 pm on 25 May, 2023\nCONVERSATION:\n"
        'Melanie said, "I ran a charity race 0."\n\n')
    only_temporal = lc.load_locomo(str(data), categories=[2], temporal_suffix=False)
    assert [q.text.endswith("support group?\n") for q in only_temporal[0].questions] == [True, False]


def test_realtalk_chats_in_epicache_merge_order(data) -> None:
    samples = lc.load_realtalk(str(data))
    assert [s.id for s in samples] == ["Chat_10_Fahim_Muhhamed", "Chat_1_Emi_Elise"], "sorted file names"
    s = samples[1]
    assert s.context == (
        "Below is a conversation between two people: Emi and Elise. The conversation takes place over multiple days "
        "and the date of each conversation is written at the beginning of the conversation.\n\n"
        "DATE: 29.12.2023, 22:42:04\nCONVERSATION:\n"
        'Emi said, "Hey! How are you 1?"\n'
        'Elise said, "Look!"\nElise shared, an image of "a dog on a beach".\n\n')
    assert [q.meta["category"] for q in s.questions] == ["1", "3"]
    assert s.questions[1].text.endswith("Question: Where does Elise live?\nAnswer:\n")
    merged = data / "merged"
    merged.mkdir()
    (merged / "realtalk10.json").write_text(json.dumps([realtalk_chat(1)]))
    assert lc.load_realtalk(str(merged))[0].context == s.context, "EpiCache's merged realtalk10.json also reads"


def test_longmemeval_one_sample_per_question(data) -> None:
    samples = lc.load_longmemeval(str(data))
    assert [s.id for s in samples] == ["e47becba", "gpt4_2655b836_abs"]
    s = samples[0]
    assert s.context.startswith("Below is a conversation history between a user and an assistant.")
    assert ("TIMESTAMP: 2023/05/20 (Sat) 02:21\nSESSION: s_1\nCONVERSATION:\nUser: I bought a red bike today.\n"
            "Assistant: Nice choice!\n\nTIMESTAMP: 2023/05/21 (Sun) 10:00") in s.context
    q = s.questions[0]
    assert q.text.endswith("\nCurrent Date: 2023/05/30 (Tue) 23:40\nQuestion: What color is my bike?\n")
    assert q.meta == {"category": "single-session-user", "abstention": False}
    assert samples[1].questions[0].meta["abstention"] is True


def test_missing_files_offline_are_one_clear_message(tmp_path) -> None:
    with pytest.raises(DataMissingError, match=r"locomo10\.json.*prepare_data\.py longconvqa --only locomo"):
        lc.load_locomo(str(tmp_path))
    with pytest.raises(DataMissingError, match=r"prepare_data\.py longconvqa --only realtalk"):
        lc.load_realtalk(str(tmp_path))
    with pytest.raises(DataMissingError, match=r"longmemeval_s_cleaned\.json.*--only longmemeval_s"):
        lc.load_longmemeval(str(tmp_path))


# ------------------------------------------------------------------------------------------------ configs and runs


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", ["locomo", "realtalk", "longmemeval_s"])
def test_configs_default_to_query_agnostic_and_load(data, name) -> None:
    cfg = composed(f"task=longconvqa/{name}", f"paths.data={data.parent}", f"task.loader.data_dir={data}")
    assert cfg.protocol == "query_agnostic" and "/query_agnostic/" in cfg.run_dir
    assert composed(f"task=longconvqa/{name}", "protocol=query_aware").protocol == "query_aware"
    assert load_samples(cfg.task, limit=1)


def test_run_shares_one_compressed_conversation_and_reports_categories(data, tmp_path) -> None:
    cfg = composed("task=longconvqa/locomo", f"task.loader.data_dir={data}", "method=snapkv", "budget=0.5",
                   f"paths.results={tmp_path / 'results'}", "progress=false", "limit=1", "task.max_new_tokens=3")
    metrics = run(cfg)
    assert metrics["protocol"] == "query_agnostic" and metrics["n_questions"] == 5 and metrics["n_samples"] == 1
    assert set(metrics["score_by_category"]) == {"temporal", "single_hop", "multi_hop", "open_domain"}
    assert set(metrics["score_by_category"]["temporal"]) == {"conv_f1"}
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "predictions.jsonl").read_text().splitlines()]
    assert len({r["context_tokens"] for r in records}) == 1 and len({r["kept_entries"] for r in records}) == 1
    assert all(r["question_s"] is not None for r in records), "questions are appended over the compressed context"


def test_prepare_fetches_the_pinned_release_files_with_their_checksums(monkeypatch, tmp_path) -> None:
    urls, hub = [], []
    monkeypatch.setattr(lc, "download", lambda url, path, **kw: urls.append((url, path, kw)) or path)
    monkeypatch.setattr(lc, "fetch_hub_files",
                        lambda repo, rev, files, dest, bench, **kw: hub.append((repo, rev, files, kw)) or [])
    lc.prepare(tmp_path, None)
    url, path, kw = urls[0]
    assert url == lc.LOCOMO_URL and path == tmp_path / "locomo10.json" and kw["root"] == tmp_path
    assert f"/locomo/{lc.LOCOMO_COMMIT}/data/" in url and kw["expected"] == lc.LOCOMO_CHECKSUM
    assert len(urls) == 11 and all(f"/REALTALK/{lc.REALTALK_COMMIT}/data/Chat_" in u for u, _, _ in urls[1:])
    assert all(kw["expected"] == lc.REALTALK_FILES[p.stem] for _, p, kw in urls[1:])
    (repo, rev, files, kw), = hub
    assert (repo, rev) == ("xiaowu0162/longmemeval-cleaned", lc.LONGMEMEVAL_REVISION)
    assert files == ["longmemeval_s_cleaned.json", "longmemeval_oracle.json"]
    assert kw["expected"] is lc.LONGMEMEVAL_CHECKSUMS


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_shipped_fixtures_are_the_ones_the_tests_write(data) -> None:
    """tests/fixtures/{ruler,needlebench,longconvqa} (for trying the tasks offline) stay in sync with the tests."""
    import test_needlebench
    import test_ruler

    assert [s.context for s in lc.load_locomo(str(FIXTURES / "longconvqa"))] == \
        [s.context for s in lc.load_locomo(str(data))]
    assert len(lc.load_realtalk(str(FIXTURES / "longconvqa"))) == 2
    assert len(lc.load_longmemeval(str(FIXTURES / "longconvqa"))) == 2
    for module, name in ((test_ruler.write_qa_fixtures, "ruler"), (test_needlebench.write_fixtures, "needlebench")):
        fresh = data / name
        fresh.mkdir()
        module(fresh)
        for path in fresh.iterdir():
            shipped = (FIXTURES / name / path.name).read_text().splitlines()
            assert [json.loads(x) for x in shipped] == [json.loads(x) for x in path.read_text().splitlines()], path


def test_cli_runs_locomo_offline_with_per_category_scores(tmp_path) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "kvbench", "task=longconvqa/locomo", "method=snapkv", "budget=0.5",
                          f"task.loader.data_dir={FIXTURES / 'longconvqa'}", "limit=1", "task.max_new_tokens=2",
                          f"paths.results={tmp_path / 'r'}", f"paths.logs={tmp_path / 'l'}", "progress=false"],
                         capture_output=True, text=True, timeout=300, cwd=CONF.parent)
    assert res.returncode == 0, res.stderr
    assert "by category" in res.stdout and "query_agnostic" in res.stdout

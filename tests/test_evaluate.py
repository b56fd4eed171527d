"""generate -> judge -> report from the CLI: on vLLM (engines and the OpenAI-compatible server)
with the tiny model, and against a local server whose chosen replies make the counts exact."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from alpagasus_ray.cli import main
from alpagasus_ray.store.records import read_jsonl

from fake_batch_server import serve as serve_batches
from fake_openai_server import serve, stats
from test_judging import PAPER_CASES

SETS = ("koala", "vicuna", "wizardlm", "sinstruct")


def _write_answers(run_dir, name, test_set, answers, categories=None):
    """An answers file as `alpagasus generate` writes it, with chosen answer texts."""
    path = run_dir / "answers" / name / f"{test_set}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{test_set}-{i}", "test_set": test_set, "category": (categories or {}).get(i),
             "instruction": f"Question {i}?", "input": "", "prompt": f"Question {i}?", "answer": text, "model": name,
             "finish_reason": "stop", "status": "ok", "error": None, "tokens_in": 3, "tokens_out": 3}
            for i, text in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rules(prompts, first="Assistant 1"):
    """Server rules: the reply to each judgment, told apart by which answer is shown first."""
    rules = []
    for cand, base, as_first, as_second in prompts:
        rules.append({"match": f"{first}'s Answer]\n{cand}\n", "reply": as_first})
        rules.append({"match": f"{first}'s Answer]\n{base}\n", "reply": as_second})
    return rules


def _judge_args(run_dir, url, *extra):
    return ["--config", "/dev/null", f"run_dir={run_dir}", "judge.backend=openai", f"judge.base_url={url}",
            "judge.model=fake", "judge.candidate=cand", "judge.baseline=base", "judge.max_retries=1",
            "judge.request_timeout=2", "judge.concurrency=16", "judge.batch_size=16", *extra]


@pytest.mark.parametrize("backend", ["openai", "openai_batch"])
def test_counts_and_winning_score_are_exact_through_judge_and_report(tmp_path, ray_local, capsys, backend):
    """The same judgments through the synchronous API and through the Batch API (request files,
    batches polled and collected, unreadable replies asked again in a follow-up batch)."""
    run = tmp_path / "run"
    koala = [(f"C{i:03d}", f"B{i:03d}", a, b) for i, (a, b) in enumerate(PAPER_CASES)]
    vicuna = [  # read on the re-ask / never readable / the request fails
        ("CV0", "BV0", ["no scores here", "8 6"], "6 8"),
        ("CV1", "BV1", ["I like both.", "Both are fine."], "7 7"),
        ("CV2", "BV2", "9 1", "1 9"),
    ]
    _write_answers(run, "cand", "koala", [p[0] for p in koala])
    _write_answers(run, "base", "koala", [p[1] for p in koala])
    categories = {0: "generic", 1: "math", 2: "coding"}
    _write_answers(run, "cand", "vicuna", [p[0] for p in vicuna], categories)
    _write_answers(run, "base", "vicuna", [p[1] for p in vicuna], categories)
    rules = [{"match": "Answer]\nCV2\n", "faults": ["500"] * 4}, *_rules(koala + vicuna)]
    with serve_batches({"rules": rules, "batch_seconds": 0.2}) as url:
        poll = ["judge.batch_poll_seconds=0.1"] if backend == "openai_batch" else []  # a key of the Batch API only
        assert main(["judge", *_judge_args(run, url, f"judge.backend={backend}", *poll)]) == 0
        sent = stats(url)["requests"]
        stats_batches = stats(url)
    assert main(["report", "--config", "/dev/null", f"run_dir={run}"]) == 0

    report = json.loads((run / "report.json").read_text())["cand_vs_base"]
    assert {k: report["koala"][k] for k in ("win", "tie", "lose", "parse_failed", "failed", "n")} == \
        {"win": 94, "tie": 71, "lose": 15, "parse_failed": 0, "failed": 0, "n": 180}
    assert report["koala"]["winning_score"] == 1.4389
    # The candidate's scores over the baseline's, summed by hand from PAPER_CASES.
    assert report["koala"]["capacity"] == round(2614 / 2406, 4)
    assert {k: report["vicuna"][k] for k in ("win", "parse_failed", "failed", "n")} == \
        {"win": 1, "parse_failed": 1, "failed": 1, "n": 1}
    assert report["vicuna"]["categories"]["generic"]["win"] == 1
    assert report["all"]["n"] == 181 and report["all"]["winning_score"] == round((95 - 15) / 181 + 1, 4)

    vicuna_judgments = {(j["id"], j["order"]): j for j in read_jsonl(run / "judgments" / "cand_vs_base" / "vicuna.jsonl")}
    assert vicuna_judgments[("vicuna-0", "candidate_first")]["attempts"] == 2  # the unreadable first reply was asked again
    parse_failed = vicuna_judgments[("vicuna-1", "candidate_first")]
    assert (parse_failed["status"], parse_failed["outcome"], parse_failed["attempts"]) == ("parse_failed", None, 2)
    assert vicuna_judgments[("vicuna-2", "baseline_first")]["status"] == "request_failed"
    # 366 judgments; two re-asks of unreadable replies; the two failing judgments sent twice
    # (max_retries=1) by the synchronous client, once in a batch (its error file holds them).
    assert sent == 366 + 2 + (2 if backend == "openai" else 0)
    if backend == "openai_batch":
        assert "batch line 500" in vicuna_judgments[("vicuna-2", "baseline_first")]["error"]
        assert stats_batches["batches_created"] == 2 and stats_batches["batch_lines"] == 366 + 2
    md = (run / "report.md").read_text()
    assert "| koala | 94 | 71 | 15 | 0 | 0 | 180 | 1.4389 |" in md
    for plot in ("cand_vs_base_win_tie_lose.png", "cand_vs_base_categories.png"):
        assert (run / "plots" / plot).stat().st_size > 10_000
    assert capsys.readouterr().out.strip().endswith("report.md")


def test_pair_prompt_and_a_rerun_asks_only_for_missing_judgments(tmp_path, ray_local, capsys):
    run = tmp_path / "run"
    prompts = [(f"C{i}", f"B{i}", "A is better. [[A]]", "Equal. [[C]]") for i in range(10)]
    _write_answers(run, "cand", "koala", [p[0] for p in prompts])
    _write_answers(run, "base", "koala", [p[1] for p in prompts])
    path = run / "judgments" / "cand_vs_base" / "koala.jsonl"
    with serve({"rules": _rules(prompts, first="Assistant A")}) as url:
        assert main(["judge", *_judge_args(run, url, "judge.prompt=pair")]) == 0
        assert len(path.read_text().splitlines()) == 20
        # A kill mid-run: the verdicts are saved a batch at a time (judge.batch_size=16) as parts;
        # the second batch's part (4 verdicts) is torn mid-write, and the outputs are never written.
        parts = sorted((path.parent / "parts").glob("part-*.parquet"), key=lambda p: pq.read_metadata(p).num_rows)
        assert [pq.read_metadata(p).num_rows for p in parts] == [4, 16]
        torn = parts[0].with_name(".tmp-" + parts[0].name)
        torn.write_bytes(parts[0].read_bytes()[:100])
        parts[0].unlink()
        path.unlink()
        before = stats(url)["requests"]
        assert main(["judge", *_judge_args(run, url, "judge.prompt=pair")]) == 0
        assert stats(url)["requests"] - before == 4 and not torn.exists()
        # The same run with the other prompt would mix verdicts: refused, naming the file.
        assert main(["judge", *_judge_args(run, url, "judge.prompt=vicuna")]) == 2
    judgments = read_jsonl(path)
    assert len(judgments) == 20 and {j["status"] for j in judgments} == {"ok"}
    assert {(j["order"], j["outcome"]) for j in judgments} == {("candidate_first", "win"), ("baseline_first", "tie")}
    assert main(["report", "--config", "/dev/null", f"run_dir={run}"]) == 0
    koala = json.loads((run / "report.json").read_text())["cand_vs_base"]["koala"]
    assert (koala["win"], koala["n"], koala["winning_score"], koala["capacity"]) == (10, 10, 2.0, None)

    # Over several runs (the paper's Fig. 2): each run's training size comes from its selection.
    smaller = tmp_path / "run-3k"
    shutil.copytree(run / "judgments", smaller / "judgments")
    (smaller / "selection.json").write_text(json.dumps({"selected": 3000}))
    assert main(["report", "--config", "/dev/null", f"run_dir={run}", f"report.runs=[{smaller}]"]) == 2
    assert f"{run}/selection.json: missing" in capsys.readouterr().err
    (run / "selection.json").write_text(json.dumps({"selected": 9229}))
    assert main(["report", "--config", "/dev/null", f"run_dir={run}", f"report.runs=[{smaller}]"]) == 0
    assert (run / "plots" / "winning_score_vs_size.png").stat().st_size > 10_000


def test_a_multi_turn_prompt_is_answered_turn_by_turn_and_judged_per_turn(tmp_path, ray_local, capsys):
    """Test sets as files (JSONL of `messages` and MT-Bench `turns`, Parquet of Alpaca rows): each
    later turn is asked with the model's own earlier answers in context, judged in both orders
    with each model's conversation, and the report counts each turn and all of them."""
    import pyarrow as pa

    run = tmp_path / "run"
    mt, single = tmp_path / "mt.jsonl", tmp_path / "single.parquet"
    mt.write_text(json.dumps({"id": "a", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "a reference answer, not used"}, {"role": "user", "content": "Q2"}]}) + "\n"
        + json.dumps({"question_id": 7, "category": "writing", "turns": ["W1", "W2", "W3"]}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"id": "s", "instruction": "S1", "input": ""}]), single)
    sets = f"generate.test_sets=[{mt}, {single}]"
    for name in ("cand", "base"):
        with serve({"echo": name.upper()}) as url:
            assert main(["generate", "--config", "/dev/null", f"run_dir={run}", sets, "generate.backend=openai",
                         f"generate.base_url={url}", "generate.model=fake", f"generate.name={name}",
                         "generate.template=chat"]) == 0
            assert stats(url)["requests"] == 6  # 2 + 3 + 1 turns
    answers = {(a["id"], a["turn"]): a for a in read_jsonl(run / "answers" / "cand" / "mt.jsonl")}
    assert sorted(answers) == [("mt-7", 1), ("mt-7", 2), ("mt-7", 3), ("mt-a", 1), ("mt-a", 2)]
    assert answers["mt-a", 1]["answer"] == "CAND after 2 messages: Q1"  # the system turn, the question
    second = answers["mt-a", 2]
    assert second["answer"] == "CAND after 4 messages: Q2" and second["instruction"] == "Q2"
    assert second["history"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                                 {"role": "assistant", "content": "CAND after 2 messages: Q1"}]
    assert answers["mt-7", 3]["answer"] == "CAND after 5 messages: W3" and answers["mt-7", 3]["category"] == "writing"
    assert read_jsonl(run / "answers" / "cand" / "single.jsonl")[0]["answer"] == "CAND after 1 messages: S1"

    # The judge prefers the candidate's first answers and the baseline's later ones.
    rules = [{"match": f"Assistant A's Answer]\n{first}", "reply": verdict} for first, verdict in
             (("CAND", "[[A]]"), ("BASE", "[[B]]"))]
    rules += [{"match": f"Assistant A's Conversation with the User]\n### User:\n{q}\n\n### Assistant:\n{first}",
               "reply": verdict} for q in ("Q1", "W1") for first, verdict in (("CAND", "[[B]]"), ("BASE", "[[A]]"))]
    with serve({"rules": rules}) as url:
        assert main(["judge", *_judge_args(run, url, "judge.prompt=pair")]) == 0
        assert stats(url)["requests"] == 12 and stats(url)["by_status"] == {"200": 12}
    judged = read_jsonl(run / "judgments" / "cand_vs_base" / "mt.jsonl")
    assert {(j["id"], j["turn"], j["outcome"]) for j in judged} == {
        ("mt-a", 1, "win"), ("mt-a", 2, "lose"), ("mt-7", 1, "win"), ("mt-7", 2, "lose"), ("mt-7", 3, "lose")}
    assert main(["report", "--config", "/dev/null", f"run_dir={run}", "report.plots=false"]) == 0
    report = json.loads((run / "report.json").read_text())["cand_vs_base"]
    everything = report["all"]
    assert (everything["win"], everything["lose"], everything["n"], everything["winning_score"]) == (3, 3, 6, 1.0)
    assert {turn: (t["win"], t["lose"], t["n"]) for turn, t in everything["turns"].items()} == {
        "1": (3, 0, 3), "2": (0, 2, 2), "3": (0, 1, 1)}
    assert (report["mt"]["win"], report["mt"]["lose"]) == (2, 3) and "turns" not in report["single"]
    assert "| mt | 2 | 0 | 0 | 2 | 2 | 0.0000 |" in (run / "report.md").read_text()


def test_bad_inputs_name_the_file_and_ids(tmp_path, capsys):
    run = tmp_path / "run"
    _write_answers(run, "cand", "koala", ["a", "b", "c"])
    _write_answers(run, "base", "koala", ["a", "b"])
    assert main(["judge", "--config", "/dev/null", f"run_dir={run}", "judge.candidate=cand", "judge.baseline=base",
                 "judge.base_url=http://127.0.0.1:9/v1"]) == 2
    err = capsys.readouterr().err
    assert "cand/koala.jsonl and " in err and "base/koala.jsonl answer different prompts" in err and "['koala-2']" in err

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["generate", "--config", "/dev/null", f"run_dir={run}", f"generate.model={broken}"]) == 2
    assert f"{broken}: the model directory does not load" in capsys.readouterr().err
    assert main(["generate", "--config", "/dev/null", f"run_dir={run}"]) == 2
    assert f"{run}/model: no such model directory" in capsys.readouterr().err

    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"id": 1, "question": "?"}) + "\n")
    assert main(["generate", "--config", "/dev/null", f"run_dir={run}", "generate.model=builtin:tiny-llama",
                 f"generate.test_sets=[{odd}]"]) == 2
    assert "odd.jsonl:1: unknown test-set format" in capsys.readouterr().err


def test_answers_brought_from_elsewhere_are_checked_before_anything_is_sent(tmp_path, capsys):
    """Answers written by another tool: the documented fields are enough (no status, no prompt);
    a file that breaks the format stops with exit 2 naming the file, the line and the field, and
    the judge's server sees no request."""
    run = tmp_path / "run"
    minimal = [{"id": i, "test_set": "vicuna", "instruction": f"Q{i}?", "answer": f"A{i}"} for i in range(3)]
    for name in ("cand", "base"):
        path = run / "answers" / name / "vicuna.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in minimal))
    bad_cases = [
        ({"id": 1, "test_set": "vicuna", "answer": "A1"}, "vicuna.jsonl:2: missing field 'instruction'"),
        ({"id": 1, "test_set": "vicuna", "instruction": "Q1?", "answer": None}, "vicuna.jsonl:2: field 'answer' is NoneType, expected str"),
        ({"id": 1, "test_set": "koala", "instruction": "Q1?", "answer": "A"}, "vicuna.jsonl:2: an answer of test set 'koala'"),
        ({"id": 0, "test_set": "vicuna", "instruction": "Q1?", "answer": "A"}, "vicuna.jsonl:2: id '0' again (first at line 1)"),
        ({"id": 1, "test_set": "vicuna", "instruction": "Q1?", "answer": "A", "status": 3}, "field 'status' is int, expected str"),
        ({"id": 1, "test_set": "vicuna", "instruction": "Q1?", "answer": "A", "turn": 2},
         "vicuna.jsonl:2: turn 2 needs a 'history' of the 1 exchanges before it"),
    ]
    cand = run / "answers" / "cand" / "vicuna.jsonl"
    with serve({"reply": "8 6"}) as url:
        for record, message in bad_cases:
            cand.write_text("".join(json.dumps(r) + "\n" for r in [minimal[0], record, minimal[2]]))
            assert main(["judge", *_judge_args(run, url)]) == 2
            err = capsys.readouterr().err
            assert message in err and str(cand) in err, err
        cand.write_text(json.dumps(minimal[0]) + "\n" + "{not json\n")
        assert main(["judge", *_judge_args(run, url)]) == 2
        assert f"{cand}:2: not valid JSON" in capsys.readouterr().err
        assert stats(url)["requests"] == 0
        cand.write_text("".join(json.dumps(r) + "\n" for r in minimal))  # the documented minimum is judged
        assert main(["judge", *_judge_args(run, url)]) == 0
        assert stats(url)["requests"] == 6
    verdicts = read_jsonl(str(run / "judgments" / "cand_vs_base" / "vicuna.jsonl"))
    assert len(verdicts) == 6 and {v["status"] for v in verdicts} == {"ok"}


@pytest.mark.slow
def test_generate_judge_report_on_vllm_with_the_tiny_model(tmp_path, tiny_model, vllm_server, ray_local, capsys):
    """Greedy answers from Ray Data LLM engines equal vLLM's server's answers to the same Alpaca
    prompts; the tiny model then judges them (mostly unreadably: it is random, and a prompt longer
    than the server's context fails alone) and the report adds up."""
    run = tmp_path / "run"
    mt = tmp_path / "mt.jsonl"  # one prompt of two turns: the second asked after the model's first answer
    mt.write_text(json.dumps({"question_id": 1, "turns": ["Name a colour.", "And another?"]}) + "\n")
    common = ["--config", "/dev/null", f"run_dir={run}", f"generate.model={tiny_model}", "generate.limit=2",
              "generate.max_tokens=12", f"generate.test_sets=[{', '.join(SETS)}, {mt}]"]
    assert main(["generate", *common, "generate.name=engine", "generate.use_gpu=false", "generate.max_model_len=1024"]) == 0
    assert main(["generate", *common, "generate.name=server", "generate.backend=openai", f"generate.base_url={vllm_server}"]) == 0
    engine, server = (read_jsonl(run / "answers" / name / "mt.jsonl") for name in ("engine", "server"))
    assert [(a["turn"], a["answer"]) for a in engine] == [(a["turn"], a["answer"]) for a in server]
    assert engine[1]["prompt"].endswith(engine[0]["answer"] + "\n\n### Instruction:\nAnd another?\n\n### Response:")
    for ts in SETS:
        engine = read_jsonl(run / "answers" / "engine" / f"{ts}.jsonl")
        server = read_jsonl(run / "answers" / "server" / f"{ts}.jsonl")
        assert [a["id"] for a in engine] == [a["id"] for a in server] and len(engine) == 2
        for a, b in zip(engine, server):
            assert a["prompt"].endswith("### Response:") and a["test_set"] == ts
            assert 0 < a["tokens_out"] <= 12 and a["finish_reason"] == ("length" if a["tokens_out"] == 12 else "stop")
            assert (a["answer"], a["finish_reason"]) == (b["answer"], b["finish_reason"])
    assert read_jsonl(run / "answers" / "engine" / "vicuna.jsonl")[0]["category"] == "generic"

    assert main(["judge", "--config", "/dev/null", f"run_dir={run}", "judge.backend=openai", f"judge.base_url={vllm_server}",
                 f"judge.model={tiny_model}", "judge.max_tokens=8", "judge.candidate=engine", "judge.baseline=server"]) == 0
    judgments = [j for ts in (*SETS, "mt") for j in read_jsonl(run / "judgments" / "engine_vs_server" / f"{ts}.jsonl")]
    assert len(judgments) == 20
    for j in judgments:
        assert (j["outcome"] is None) == (j["status"] != "ok")
        if j["status"] == "parse_failed":
            assert j["attempts"] == 2
        elif j["status"] == "request_failed":  # the tiny tokenizer's long Self-Instruct prompts exceed 1,024 tokens
            assert "maximum context length" in j["error"]
    assert main(["report", "--config", "/dev/null", f"run_dir={run}"]) == 0
    report = json.loads((run / "report.json").read_text())["engine_vs_server"]
    for ts in (*SETS, "mt"):
        t = report[ts]
        assert t["win"] + t["tie"] + t["lose"] + t["parse_failed"] + t["failed"] == 2
    assert set(report["mt"]["turns"]) == {"1", "2"}
    md = (run / "report.md").read_text()
    assert "these scores carry no meaning" in md and "answers/engine/koala.jsonl" in md


@pytest.mark.slow
def test_generate_killed_mid_way_resumes_without_asking_again_for_saved_answers(tmp_path, reap_ray_orphans):
    """Kill -9 `alpagasus generate` and every Ray process it started once a few batches of answers
    are saved, then run the same command again: every prompt is answered once in the output, and
    the answers saved before the kill were never asked for again."""
    import os
    import subprocess
    import sys

    from alpagasus_ray.testsets import load_test_set
    from processes import kill_job_when

    n = 40
    prompts = load_test_set("koala", n)
    run_dir = tmp_path / "run"
    parts = run_dir / "answers" / "fake" / "parts"
    with serve({"latency": 0.25, "rules": [{"match": p["instruction"]} for p in prompts]}) as url:
        command = [sys.executable, "-m", "alpagasus_ray.cli", "generate", "--config", "/dev/null", f"run_dir={run_dir}",
                   "generate.backend=openai", f"generate.base_url={url}", "generate.model=fake", "generate.name=fake",
                   "generate.test_sets=[koala]", f"generate.limit={n}", "generate.concurrency=4",
                   "generate.batch_size=4", "generate.max_tokens=16", "generate.template=chat"]
        env = {**os.environ, "OPENAI_API_KEY": "sk-unused"}
        kill_job_when(command, env, tmp_path / "first.log", lambda: len(list(parts.glob("part-*.parquet"))) >= 3)
        saved = pq.read_table(parts, columns=["id", "status"]).to_pylist()
        saved_ids = {r["id"] for r in saved if r["status"] == "ok"}
        assert 0 < len(saved_ids) < n, saved
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        seen = stats(url)
    assert again.returncode == 0, again.stderr[-3000:]
    answers = read_jsonl(run_dir / "answers" / "fake" / "koala.jsonl")
    assert [a["id"] for a in answers] == [p["id"] for p in prompts] and {a["status"] for a in answers} == {"ok"}
    by_id = {p["id"]: p["instruction"] for p in prompts}
    assert all(seen["by_rule"][by_id[i]] == 1 for i in saved_ids)
    # Sent twice at most: the requests in flight (4) and the answered rows of batches partly done.
    assert seen["requests"] - n <= 4 + 4 + 3
    record = json.load(open(run_dir / "answers" / "fake" / "generation.json"))
    assert record["generated_this_run"] == n - len(saved_ids)

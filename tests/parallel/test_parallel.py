"""Tuning on a device mesh (CPU, gloo) equals tuning in one process; so does decoding split tp x pp.

Each mesh run and its single-process reference tune the tiny model for 4 steps on the same data;
they must agree on the logged loss of every step (relative 1e-6) and on every tuned exit weight
(absolute 1e-6; the weights are O(0.1-1), one step moves them by ~lr = 1e-2). What differs is only
the order of floating-point sums (sharded norms and matmuls, all-reduces): <= 3e-7 here. Most runs
train against the final layer (teacher CE + KD): the random tiny model's CE against the data is
~58 nats, a near one-hot softmax where such last-bit differences grow to ~1e-5 in the weights
after 4 steps (measured; the losses still agree to 1e-7), which would test the model, not us. All 2-process runs share one
torchrun launch and all 4-process runs another (tests/parallel/mesh_runs.py): starting processes and
importing torch is most of the cost.

Decoding (`generate` on `parallel.tp` x `parallel.pp` ranks) must give exactly the single process's
tokens and exit layers in every mode, on every rank: greedy, sampled with a seed, early exit (max_prob and learned
confidence), self-speculative with a fixed and an adaptive draft length. Exits copied from the last
layer make drafts at exit 3 agree with the full model, so verification accepts as well as rejects.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from eetune.config import compose_config
from eetune.errors import EetuneError
from eetune.exits import load_exits
from eetune.models import get_model_entry
from eetune.models.tiny import write_tiny_checkpoint
from eetune.parallel import on_mesh
from eetune.parallel.checkpoint import check_same_mesh
from eetune.parallel.load import CheckpointTensors
from eetune.parallel.mesh import ParallelDims
from eetune.parallel.pipeline import plan_stages
from eetune.stages import augment, generate, tune
from eetune.stages import eval as eval_stage

REPO = Path(__file__).resolve().parents[2]
LOSS_RTOL = 1e-6
WEIGHT_ATOL = 1e-6

# Teacher CE + KD + confidence estimators: every path that needs the final layer.
TEACHER = ["loss.ce_target=teacher", "loss.kd_alpha=0.5", "exits.confidence=linear"]
LABELS = ["loss.ce_target=labels", "loss.kd_alpha=0", "exits.confidence=none"]

# name -> (training settings shared with the reference, mesh settings)
TWO_PROCESS = {
    "fsdp": (TEACHER, ["parallel.dp_shard=2"]),
    "tp": (TEACHER, ["parallel.tp=2", "parallel.dp_shard=1"]),
    "pp": (TEACHER, ["parallel.pp=2", "parallel.dp_shard=1"]),
    # Layers 1-2 and 3: stage 0 holds no exit, layer 4 is never built (partial pipeline).
    "pp_partial": ([*LABELS, "exits.layers=[3]"], ["parallel.pp=2", "parallel.dp_shard=1"]),
}
FOUR_PROCESS = {
    "fsdp_tp": (TEACHER, ["parallel.dp_shard=2", "parallel.tp=2"]),
    "pp_fsdp": (TEACHER, ["parallel.pp=2", "parallel.dp_shard=2"]),
    "hsdp": (TEACHER, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    # Trainable vocabulary-parallel heads and attention exits, sharded over tp and dp.
    "fsdp_tp_copy_heads": ([*TEACHER, "exits.head=copy", "exits.arch=layer"], ["parallel.dp_shard=2", "parallel.tp=2"]),
}

# bf16 FSDP2 mixed precision (bf16 compute, fp32 master exits) against a single bf16 process; random
# exits against the labels, so the losses are large and move.
BF16 = [*LABELS, "exits.init=random", "model.dtype=bfloat16"]

# Decoding cases: name -> (exits run, generate settings); run on 2 ranks (tp=2, and pp=2) and in one process.
DECODES = {
    "full": (None, ["generate.mode=full"]),
    "early_exit": ("random_mlp", ["generate.mode=early_exit", "generate.threshold=0.006"]),
    "early_exit_learned": ("random_mlp", ["generate.mode=early_exit", "generate.confidence=learned",
                                          "generate.threshold=0.5"]),
    "self_speculative": ("copied_layer", ["generate.mode=self_speculative", "generate.draft_exit=3",
                                          "generate.draft_len=3"]),
    "self_speculative_adaptive": ("copied_layer", ["generate.mode=self_speculative", "generate.draft_exit=2",
                                                   "generate.draft_schedule=adaptive"]),
    "sampled_early_exit": ("random_mlp", ["generate.mode=early_exit", "generate.threshold=0.006",
                                            "generate.temperature=0.8", "generate.seed=3"]),
    "sampled_self_speculative": ("copied_layer", ["generate.mode=self_speculative", "generate.draft_exit=3",
                                                  "generate.temperature=0.8", "generate.seed=3"]),
}
# On 4 ranks (tp=4, and tp=2 x pp=2), a tiny model with 4 KV heads.
FOUR_WAY_DECODES = ("full", "early_exit", "self_speculative")
# Meshes decoding runs on: name -> (processes, overrides). 4 layers in 2 stages: exits at 1 and 3 are
# inside a stage, the exit at 2 ends the first.
DECODE_MESHES = {
    "tp": (2, ["parallel.tp=2"]),
    "pp": (2, ["parallel.pp=2"]),
    "tp4": (4, ["parallel.tp=4"]),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}
EXIT_RUNS = {
    "random_mlp": ["exits.arch=mlp", "exits.init=random", "exits.head=copy", "exits.confidence=linear"],
    "copied_layer": ["exits.arch=layer", "exits.init=copy", "exits.head=copy", "exits.confidence=none"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(topics["assignment"][:6000])
    return path


@pytest.fixture(scope="module")
def common(tiny_base_model, corpus) -> list[str]:
    return [
        f"model.checkpoint_dir={tiny_base_model.checkpoint_dir}", "model.dtype=float32",
        "data=text", f"data.path={corpus}", "data.seq_len=32", "data.batch_size=4", "data.cache_hidden=false",
        "data.heldout_sequences=2", "exits.layers=[1,2,3]", "exits.arch=mlp", "exits.head=shared",
        "optim.lr=1e-2", "optim.warmup_steps=2", "train.steps=4", "train.checkpoint_every=2",
        "train.eval_every=2", "train.flat_patience=0",
    ]


class References:
    """Single-process runs, one per distinct training setting, made on first use."""

    def __init__(self, root: Path, common: list[str]) -> None:
        self.root, self.common, self.runs = root, common, {}

    def __call__(self, settings: list[str]) -> Path:
        key = tuple(settings)
        if key not in self.runs:
            run_dir = self.root / f"reference-{len(self.runs)}"
            tune.run(compose_config("tune", [*self.common, *settings, f"run_dir={run_dir}"]))
            self.runs[key] = run_dir
        return self.runs[key]


@pytest.fixture(scope="module")
def references(tmp_path_factory, common) -> References:
    return References(tmp_path_factory.mktemp("references"), common)


def launch(nproc: int, runs: list[dict], tmp: Path) -> None:
    spec = tmp / "runs.json"
    spec.write_text(json.dumps(runs))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         str(REPO / "tests" / "parallel" / "mesh_runs.py"), str(spec)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def EVAL_DATA(common: list[str]) -> list[str]:
    return [o for o in common if o.startswith("data")]


def augment_overrides(name: str, common: list[str]) -> list[str]:
    model = [o for o in common if o.startswith("model.")]
    return [*model, *EVAL_DATA(common), "exits.layers=[1,2,3]", *EXIT_RUNS[name], "seed=3"]


class Decodes:
    """`generate` settings for one tiny checkpoint, with its exits (augment runs made on first use)."""

    def __init__(self, root: Path, checkpoint_dir: Path) -> None:
        self.root, self.model = root, [f"model.checkpoint_dir={checkpoint_dir}", "model.dtype=float32"]
        for name, settings in EXIT_RUNS.items():
            augment.run(compose_config("augment", [*self.model, "exits.layers=[1,2,3]", *settings,
                                                   f"run_dir={root / name}"]))

    def overrides(self, name: str) -> list[str]:
        run, settings = DECODES[name]
        exits = [] if run is None else [f"generate.run_dir={self.root / run}"]
        return [*self.model, *exits, *settings, "generate.prompt='The quick brown fox'", "generate.max_new_tokens=16"]

    def on_mesh(self, name: str, mesh: str, out_dir: Path) -> dict:
        return {"stage": "generate", "out": str(out_dir / f"{mesh}_{name}"),
                "overrides": [*self.overrides(name), *DECODE_MESHES[mesh][1], "parallel.dp_shard=1"]}

    def eval_overrides(self, data: list[str], out_dir: Path) -> list[str]:
        return [*self.model, f"run_dir={self.root / 'random_mlp'}", *data, "eval.thresholds=[1.0,0.006]",
                "eval.max_items=2", "eval.max_new_tokens=8", "eval.timing_repeats=2", "eval.calibrate=false",
                f"eval.out_dir={out_dir}"]

    def in_one_process(self, name: str) -> dict:
        out = io.StringIO()
        result = generate.run(compose_config("generate", self.overrides(name)), out=out)
        return {"tokens": result.result.tokens, "exit_layers": result.result.exit_layers,
                "accepted": result.result.accepted_tokens, "text": out.getvalue()}


@pytest.fixture(scope="module")
def decodes(tmp_path_factory, tiny_base_model) -> Decodes:
    return Decodes(tmp_path_factory.mktemp("decodes"), tiny_base_model.checkpoint_dir)


@pytest.fixture(scope="module")
def four_way_decodes(tmp_path_factory) -> Decodes:
    root = tmp_path_factory.mktemp("decodes4")
    checkpoint_dir = write_tiny_checkpoint(get_model_entry("smollm2_135m"), root / "checkpoint", seed=1,
                                           num_hidden_layers=4, num_key_value_heads=4, tie_word_embeddings=False)
    return Decodes(root, checkpoint_dir)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, common, references, decodes) -> dict[str, Path]:
    """The 2-process meshes, plus an interrupted FSDP run resumed, plus exits moved to a TP mesh."""
    root = tmp_path_factory.mktemp("mesh2")
    runs, dirs = [], {}
    for name, (settings, mesh) in TWO_PROCESS.items():
        dirs[name] = root / name
        runs.append({"overrides": [*common, *settings, *mesh, f"run_dir={dirs[name]}"]})
    fsdp = [*common, *TEACHER, "parallel.dp_shard=2", f"run_dir={root / 'resumed'}"]
    runs.append({"overrides": fsdp, "stop_after": 3})  # state saved at step 2, then "killed"
    runs.append({"overrides": [*fsdp, "resume=true"]})
    dirs["resumed"] = root / "resumed"
    # A start refused on the mesh (missing init_from) leaves no run dir: the corrected command then
    # runs there. It finishes 3 steps and is extended to 6 by a resume with a larger train.steps.
    extended = [*common, *TEACHER, "parallel.dp_shard=2", f"run_dir={root / 'extended'}"]
    runs.append({"overrides": [*extended, "train.steps=3", f"train.init_from={root / 'nonexistent'}"],
                 "refused": "run dir not found"})
    runs.append({"overrides": [*extended, "train.steps=3"]})
    runs.append({"overrides": [*extended, "train.steps=6", "resume=true"]})
    dirs["extended"] = root / "extended"
    dirs["init_from_fsdp"] = root / "init_from_fsdp"
    runs.append({"overrides": [*common, *TEACHER, "parallel.tp=2", "parallel.dp_shard=1",
                               f"train.init_from={dirs['fsdp']}", f"run_dir={dirs['init_from_fsdp']}"]})
    dirs["fsdp_bf16"] = root / "fsdp_bf16"
    runs.append({"overrides": [*common, *BF16, "parallel.dp_shard=2", f"run_dir={dirs['fsdp_bf16']}"]})
    runs += [{"stage": "augment", "overrides": [*augment_overrides(name, common), *DECODE_MESHES[mesh][1],
                                                "parallel.dp_shard=1", f"run_dir={root / f'augmented_{mesh}_{name}'}"]}
             for mesh in ("tp", "pp") for name in EXIT_RUNS]
    runs += [decodes.on_mesh(name, mesh, root) for mesh in ("tp", "pp") for name in DECODES]
    for mesh in ("tp", "pp"):
        runs.append({"stage": "eval", "out": str(root / f"eval_{mesh}"),
                     "overrides": [*decodes.eval_overrides(EVAL_DATA(common), root / f"eval_{mesh}"),
                                   *DECODE_MESHES[mesh][1], "parallel.dp_shard=1"]})
    runs.append({"stage": "vocab_split", "out": str(root / "vocab_split")})
    launch(2, runs, root)
    return dirs


@pytest.fixture(scope="module")
def four_process_runs(tmp_path_factory, common, four_way_decodes) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mesh4")
    dirs = {name: root / name for name in FOUR_PROCESS}
    runs = [{"overrides": [*common, *settings, *mesh, f"run_dir={dirs[name]}"]}
            for name, (settings, mesh) in FOUR_PROCESS.items()]
    runs += [four_way_decodes.on_mesh(name, mesh, root) for mesh in ("tp4", "tp2pp2") for name in FOUR_WAY_DECODES]
    runs.append({"stage": "holdings", "out": str(root / "holdings"),
                 "overrides": [*four_way_decodes.overrides("self_speculative"), "parallel.tp=2", "parallel.pp=2",
                               "parallel.dp_shard=1"]})
    launch(4, runs, root)
    return dirs


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def assert_same_run(mesh_dir: Path, reference_dir: Path, steps: int = 4) -> None:
    expected, got = train_losses(reference_dir), train_losses(mesh_dir)
    assert len(got) == len(expected) == steps
    assert got == pytest.approx(expected, rel=LOSS_RTOL, abs=0)
    reference, tuned = load_file(str(reference_dir / "exits.safetensors")), load_file(str(mesh_dir / "exits.safetensors"))
    assert tuned.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(tuned[key], reference[key], rtol=0, atol=WEIGHT_ATOL)
    assert got[-1] < got[0]  # it trained: the equality is not "nothing moved"
    counts = "draft_vocab.safetensors"  # the FR-Spec token frequencies, written by rank 0
    assert load_file(str(mesh_dir / counts))["counts"].equal(load_file(str(reference_dir / counts))["counts"])


@pytest.mark.parametrize("name", ["fsdp", "tp", "pp", "pp_partial"])
def test_two_process_mesh_tunes_like_one_process(name, two_process_runs, references):
    settings, _ = TWO_PROCESS[name]
    assert_same_run(two_process_runs[name], references(settings))


@pytest.mark.parametrize("name", list(FOUR_PROCESS))
def test_four_process_mesh_tunes_like_one_process(name, four_process_runs, references):
    settings, _ = FOUR_PROCESS[name]
    assert_same_run(four_process_runs[name], references(settings))


def assert_decoded_alike(mesh_out: Path, nproc: int, reference: dict) -> None:
    ranks = [json.loads(Path(f"{mesh_out}.rank{rank}.json").read_text()) for rank in range(nproc)]
    for rank, decoded in enumerate(ranks):
        for key in ("tokens", "exit_layers", "accepted"):
            assert decoded[key] == reference[key], (rank, key)
    assert ranks[0]["text"] == reference["text"] and all(r["text"] == "" for r in ranks[1:])  # rank 0 prints
    assert len(reference["tokens"]) >= 4  # up to 16, or the stop token


@pytest.mark.parametrize("name", list(DECODES))
def test_two_process_mesh_decoding_equals_one_process(name, two_process_runs, decodes):
    """tp=2 and pp=2 decode every setting as one process does."""
    reference = decodes.in_one_process(name)
    for mesh in ("tp", "pp"):
        assert_decoded_alike(two_process_runs["fsdp"].parent / f"{mesh}_{name}", 2, reference)
    # Not vacuous: early exits leave at several depths, copied-exit drafts are accepted.
    if name.startswith(("early_exit", "sampled_early")):
        assert len(set(reference["exit_layers"])) > 1
    if name in ("self_speculative", "sampled_self_speculative"):
        assert reference["accepted"] > 0


@pytest.mark.parametrize("name", FOUR_WAY_DECODES)
def test_four_process_mesh_decoding_equals_one_process(name, four_process_runs, four_way_decodes):
    reference = four_way_decodes.in_one_process(name)
    for mesh in ("tp4", "tp2pp2"):
        assert_decoded_alike(four_process_runs["fsdp_tp"].parent / f"{mesh}_{name}", 4, reference)


def test_a_rank_holds_its_stage_and_slices_only(four_process_runs):
    """tp=2 x pp=2 on 4 layers: a rank holds its stage's 2 layers (KV caches included) at half their
    heads, half the LM head's rows and every exit split in two; the other layers are never loaded."""
    ranks = [json.loads(Path(f"{four_process_runs['fsdp_tp'].parent / 'holdings'}.rank{r}.json").read_text())
             for r in range(4)]
    for rank, held in enumerate(ranks):
        stage = rank // 2  # the mesh is (pp, tp): ranks 0-1 run layers 0-1, ranks 2-3 layers 2-3
        assert held["layers"] == [2 * stage, 2 * stage + 1], rank
        assert held["caches"] == held["layers"]
        assert held["kv_heads"] == 2 and held["head_rows"] == 128 and held["exit_q_rows"] == 32  # of 4, 256, 64
    assert ranks[0]["vocab"] == 256


def test_a_vocabulary_split_unevenly_gathers_the_whole_logits(two_process_runs):
    """7 rows over 2 ranks (4 + 3 and a zero row): gathered logits and rows equal the whole head's."""
    root = two_process_runs["fsdp"].parent
    for rank in range(2):
        assert json.loads(Path(f"{root / 'vocab_split'}.rank{rank}.json").read_text()) == {"logits": True, "rows": True}


@pytest.fixture(scope="module")
def single_eval(decodes, common, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single_eval") / "out"
    return eval_stage.run(compose_config("eval", decodes.eval_overrides(EVAL_DATA(common), out))).report


@pytest.mark.parametrize("mesh", ["tp", "pp"])
def test_mesh_eval_measures_like_one_process(mesh, two_process_runs, single_eval):
    root, single = two_process_runs["fsdp"].parent, single_eval
    ranks = [json.loads(Path(f"{root / f'eval_{mesh}'}.rank{rank}.json").read_text()) for rank in range(2)]
    assert (root / f"eval_{mesh}" / "report.json").is_file()  # written once, by rank 0
    for report in ranks:
        # Teacher-forced per-exit metrics: equal up to the order of the tensor-parallel sums.
        assert [e["layer"] for e in report["per_exit"]] == [e["layer"] for e in single["per_exit"]]
        for got, want in zip(report["per_exit"], single["per_exit"]):
            for key, value in want.items():
                if isinstance(value, float):
                    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        # Decoding through the engine: the same text, tokens and exits. The per-exit settings come
        # from timings (eetune.eval.per_exit): every rank sweeps rank 0's, the single process its own.
        assert [r["setting"] for r in report["sweep"]] == [r["setting"] for r in ranks[0]["sweep"]]
        assert report["per_exit_thresholds"] == ranks[0]["per_exit_thresholds"]
        assert ([r["setting"] for r in report["sweep"] if r["exit_thresholds"] is None]
                == [r["setting"] for r in single["sweep"] if r["exit_thresholds"] is None])
        theirs = {r["setting"]: r for r in single["sweep"]}
        for got, want in ((r, theirs[r["setting"]]) for r in report["sweep"] if r["setting"] in theirs):
            # task_scores hold the multiple-choice accuracies too (log-likelihood under the setting's policy).
            for key in ("outputs", "exit_counts", "tokens", "token_agreement", "task_scores", "mean_layers"):
                assert got[key] == want[key], (want["setting"], key)
    assert any(r["mode"] == "early_exit" and len(r["exit_counts"]) > 1 for r in single["sweep"])


# Requests of every mode, sampled ones with seeds, a stop string, logprobs, a stream and a malformed
# body; sent 4 at a time to a batch of 4. The random tiny model's own text is one byte repeated: the answers that
# differ are those of its random early exits.
SERVE_BODIES = [
    {"max_tokens": 12, "temperature": 0},
    {"max_tokens": 12, "temperature": 0, "early_exit": {"mode": "early_exit", "threshold": 0.006}},
    {"max_tokens": 12, "temperature": 0, "early_exit": {"mode": "self_speculative", "draft_exit": 3}},
    {"max_tokens": 12, "temperature": 0.8, "seed": 5},
    {"max_tokens": 12, "temperature": 0.9, "seed": 6, "early_exit": {"mode": "early_exit", "threshold": 0.006}},
    {"max_tokens": 12, "temperature": 0.9, "seed": 7, "early_exit": {"mode": "self_speculative", "draft_exit": 2}},
    {"max_tokens": 12, "temperature": 0.9, "seed": 8, "stop": ["a", "e"]},
    {"max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2,
     "early_exit": {"mode": "early_exit", "threshold": 0.006}},
    {"max_tokens": 12, "temperature": 0.9, "seed": 9, "stream": True,
     "early_exit": {"mode": "early_exit", "threshold": 0.006}},
    {"max_tokens": "twelve"},
]


def serve_answers(url: str) -> list[tuple[int, str]]:
    import httpx

    def ask(index_body: tuple[int, dict]) -> tuple[int, str]:
        index, body = index_body
        messages = [{"role": "user", "content": f"Request {index}: tell me something"}]
        request = {"messages": messages, **body}
        if body.get("stream"):  # server-sent events: the text is the deltas joined
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=300) as response:
                events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
            chunks = [json.loads(event) for event in events if event != "[DONE]"]
            return response.status_code, "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        response = httpx.post(f"{url}/v1/chat/completions", json=request, timeout=300)
        if response.status_code != 200:
            return response.status_code, response.json()["error"]["message"]
        choice = response.json()["choices"][0]
        if choice.get("logprobs"):  # the tokens and their alternatives (values differ in the last bits)
            picked = [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in choice["logprobs"]["content"]]
            return 200, json.dumps([choice["message"]["content"], picked])
        return 200, choice["message"]["content"]

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(ask, enumerate(SERVE_BODIES)))


def test_a_server_on_a_tensor_parallel_mesh_answers_like_one_process(decodes, tmp_path):
    """`eetune serve ... parallel.nproc_per_node=2 parallel.tp=2`: rank 0 serves, rank 1 follows; the
    answers (10 requests) equal the single-process server's; Ctrl-C stops every process cleanly."""
    from eetune.serve import BackgroundServer
    from eetune.serve.server import build_app

    overrides = [*decodes.model, f"serve.run_dir={decodes.root / 'random_mlp'}", "serve.max_batch_size=4"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "eetune.cli", "serve", *overrides, "serve.port=0",
                                 "parallel.nproc_per_node=2", "parallel.tp=2"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (match := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", " ".join(log.read_text().split()))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        mesh = serve_answers(match.group(1))
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
        code = proc.wait(timeout=120)
    output = log.read_text()
    assert code == 130 and "Traceback" not in output, output[-3000:]
    assert "mesh pp=1 x dp_replicate=1 x dp_shard=1 x tp=2 on 2 processes" in output
    with BackgroundServer(build_app(compose_config("serve", overrides))) as server:
        single = serve_answers(server.url)
    assert mesh == single
    assert [status for status, _ in single] == [200] * 9 + [400]
    assert len({text for _, text in single[:9]}) > 3  # the answers differ: the comparison is not vacuous


@pytest.mark.parametrize("name", list(EXIT_RUNS))
def test_augment_on_a_mesh_writes_the_single_process_run(name, two_process_runs, common, tmp_path):
    """On tp=2 and on pp=2, random exits drawn from the same seed and exits copied from layers read
    block by block: the same tensors; the held-out scores of the split backbone equal to 1e-5."""
    augment.run(compose_config("augment", [*augment_overrides(name, common), f"run_dir={tmp_path / 'one'}"]))
    single = load_file(str(tmp_path / "one" / "exits.safetensors"))
    want = json.loads((tmp_path / "one" / "manifest.json").read_text())
    for mesh in ("tp", "pp"):
        mesh_dir = two_process_runs["fsdp"].parent / f"augmented_{mesh}_{name}"
        on_mesh = load_file(str(mesh_dir / "exits.safetensors"))
        assert on_mesh.keys() == single.keys()
        for key in single:
            assert torch.equal(on_mesh[key], single[key]), (mesh, key)
        got = json.loads((mesh_dir / "manifest.json").read_text())
        assert got["base_model"]["fingerprint"] == want["base_model"]["fingerprint"]
        assert got["exit_parameters"] == want["exit_parameters"]
        for layer, scores in want["heldout_before_tuning"].items():
            assert got["heldout_before_tuning"][layer] == pytest.approx(scores, rel=1e-5), (mesh, layer)


def test_decoding_mesh_must_not_split_data(decodes, run_cli):
    code, _, err = run_cli("generate", "--prompt", "hi", *decodes.model, "parallel.nproc_per_node=2")
    assert code == 2
    assert "splits the model by tensor and pipeline parallel only" in err
    assert "set parallel.tp x parallel.pp = 2" in err


def test_bf16_mixed_precision_mesh_tunes_like_one_bf16_process(two_process_runs, references):
    """Stated tolerance: the first step's loss equal to 1e-6 (the same bf16 forward); later losses within
    0.5% and exit weights within 0.025 (2.5 steps of lr 1e-2) after 4 steps: the mesh keeps fp32 master
    weights and reduces gradients in fp32, one process steps its bf16 compute copies' gradients, so
    updates of near-zero gradients round apart."""
    mesh_dir, reference_dir = two_process_runs["fsdp_bf16"], references(BF16)
    expected, got = train_losses(reference_dir), train_losses(mesh_dir)
    assert len(got) == len(expected) == 4
    assert got[0] == pytest.approx(expected[0], rel=1e-6)
    assert got == pytest.approx(expected, rel=5e-3)
    assert got[-1] < got[0]
    reference, tuned = load_file(str(reference_dir / "exits.safetensors")), load_file(str(mesh_dir / "exits.safetensors"))
    assert tuned.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(tuned[key].float(), reference[key].float(), rtol=0, atol=0.025)


def test_partial_pipeline_builds_nothing_past_the_deepest_exit(two_process_runs):
    manifest = json.loads((two_process_runs["pp_partial"] / "manifest.json").read_text())
    assert manifest["tune"]["mesh"] == {"pp": 2, "dp_replicate": 1, "dp_shard": 1, "tp": 1}
    # Layers 1-2 on a stage without exits, layer 3 with its exit; layer 4 nowhere.
    assert manifest["tune"]["stages"] == [{"layers": [1, 2], "exits": []}, {"layers": [3, 3], "exits": [3]}]
    heldout = manifest["tune"]["heldout"]
    assert set(heldout) == {"3"} and heldout["3"]["agreement_after"] is None  # no final layer to agree with
    # With a teacher the last stage computes the final layer, and stages split all 4 layers.
    teacher = json.loads((two_process_runs["pp"] / "manifest.json").read_text())["tune"]
    assert teacher["stages"] == [{"layers": [1, 2], "exits": [1, 2]}, {"layers": [3, 4], "exits": [3]}]
    assert teacher["heldout"]["4"]["agreement_after"] == 1.0


def test_exits_tuned_on_a_mesh_load_in_one_process(two_process_runs, tiny_base_model):
    run_dir = two_process_runs["fsdp"]
    model = load_exits(run_dir, tiny_base_model.model, tiny_base_model.fingerprint)
    saved = load_file(str(run_dir / "exits.safetensors"))
    for key, value in model.exits.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["exit_parameters"] == sum(p.numel() for p in model.exits.parameters())


def test_exits_from_one_mesh_start_a_run_on_another(two_process_runs, references):
    # FSDP-tuned exits as the starting point of a tensor-parallel run, against a single-process run
    # started from the same exits.
    reference = references([*TEACHER, f"train.init_from={two_process_runs['fsdp']}"])
    assert_same_run(two_process_runs["init_from_fsdp"], reference)


def test_interrupted_mesh_run_resumes_to_the_uninterrupted_result(two_process_runs, references):
    run_dir = two_process_runs["resumed"]
    assert json.loads((run_dir / "state" / "mesh.json").read_text())["dp_shard"] == 2
    assert_same_run(run_dir, references(TEACHER))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(3) == 1  # the steps after the step-2 state were redone, not logged twice


def test_finished_mesh_run_extended_by_a_resume_equals_a_longer_run(two_process_runs, references):
    # Warmup 2: steps 0-2 have the same lr under 3 or 6 steps; from step 3 the resumed run must use
    # the 6-step schedule (the 3-step one has decayed to its minimum there).
    run_dir = two_process_runs["extended"]
    assert_same_run(run_dir, references([*TEACHER, "train.steps=6"]), steps=6)
    assert OmegaConf.load(run_dir / "config.yaml").train.steps == 6
    assert json.loads((run_dir / "manifest.json").read_text())["tune"]["steps"] == 6


def test_mesh_state_resumes_on_its_own_mesh_only(two_process_runs):
    state_dir = two_process_runs["resumed"] / "state"
    check_same_mesh(state_dir, SimpleNamespace(dims=ParallelDims(pp=1, dp_replicate=1, dp_shard=2, tp=1)))
    with pytest.raises(EetuneError, match="saved on the mesh pp=1 x dp_replicate=1 x dp_shard=2 x tp=1, not"):
        check_same_mesh(state_dir, SimpleNamespace(dims=ParallelDims(pp=1, dp_replicate=1, dp_shard=1, tp=2)))


def test_stages_split_layers_up_to_the_deepest_exit():
    plans = plan_stages(3, depth=20, exit_layers=[4, 12, 20], needs_final=False)
    assert [(p.first, p.last, p.exits) for p in plans] == [(0, 7, (4,)), (7, 14, (12,)), (14, 20, (20,))]
    assert [p.computes_final for p in plans] == [False, False, False]
    plans = plan_stages(2, depth=4, exit_layers=[1], needs_final=True)
    assert [(p.first, p.last, p.exits, p.computes_final) for p in plans] == [(0, 2, (1,), False), (2, 4, (), True)]
    with pytest.raises(EetuneError, match="parallel.pp=4 stages need at least 4 layers"):
        plan_stages(4, depth=3, exit_layers=[3], needs_final=False)


def test_mesh_degrees_must_match_the_processes(common):
    cfg = compose_config("tune", [*common, "parallel.tp=2", "parallel.dp_shard=-1"])
    assert ParallelDims.from_config(cfg.parallel, 8) == ParallelDims(pp=1, dp_replicate=1, dp_shard=4, tp=2)
    with pytest.raises(EetuneError, match="needs a multiple of 2 processes but 3 were started"):
        ParallelDims.from_config(cfg.parallel, 3)
    cfg = compose_config("tune", [*common, "parallel.tp=2", "parallel.dp_shard=2"])
    with pytest.raises(EetuneError, match=r"needs 4 processes but 2 were started"):
        ParallelDims.from_config(cfg.parallel, 2)
    # One plain process asked for a mesh fails instead of silently running unsharded.
    with pytest.raises(EetuneError, match="needs a multiple of 2 processes but 1 were started"):
        on_mesh(compose_config("tune", [*common, "parallel.pp=2"]))
    assert not on_mesh(compose_config("tune", common))


def test_streamed_checkpoint_tensors_match_the_loaded_model(tiny_base_model):
    """What a stage reads tensor by tensor equals the whole-checkpoint load (names, values, fingerprint)."""
    from eetune.models import fingerprint

    tensors = CheckpointTensors(tiny_base_model.family, tiny_base_model.checkpoint_dir, tiny_base_model.hf_config)
    state = tiny_base_model.model.state_dict()
    assert set(tensors) == set(state)
    for name in ("layers.2.attn.q_proj.weight", "layers.0.attn.k_proj.weight", "tok_embeddings.weight"):
        torch.testing.assert_close(tensors[name], state[name], rtol=0, atol=0)
    assert fingerprint(tensors) == tiny_base_model.fingerprint


def test_cli_relaunches_itself_under_torchrun(tiny_base_model, corpus, common, references, tmp_path):
    """`eetune tune ... parallel.nproc_per_node=2` from a plain process: torchrun, 2 ranks, FSDP."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "eetune.cli", "tune", *common, *TEACHER, "parallel.nproc_per_node=2",
         f"run_dir={run_dir}"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "launching 2 processes under torchrun" in proc.stderr
    assert "mesh pp=1 x dp_replicate=1 x dp_shard=2 x tp=1 on 2 processes (cpu)" in proc.stderr
    assert_same_run(run_dir, references(TEACHER))

    # A mistake is one line and exit code 2, from the launcher and the workers alike.
    bad = subprocess.run(
        [sys.executable, "-m", "eetune.cli", "tune", *common, *LABELS, "parallel.nproc_per_node=2",
         "data.batch_size=3", f"run_dir={tmp_path / 'bad'}"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert bad.returncode == 2
    assert "error: data.batch_size=3 must be a multiple of the 2 data-parallel ranks" in bad.stderr
    assert "Traceback" not in bad.stderr

    # Its state is sharded for 2 processes: one process asked to extend it refuses it instead of
    # misreading it (resumed as it is, the finished run is left alone before any state is read).
    single = subprocess.run(
        [sys.executable, "-m", "eetune.cli", "tune", *common, *TEACHER, f"run_dir={run_dir}", "resume=true",
         "train.steps=6"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert single.returncode == 2
    assert "was saved on a mesh of 2 processes (pp=1 x dp_replicate=1 x dp_shard=2 x tp=1)" in single.stderr

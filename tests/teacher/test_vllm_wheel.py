"""Slow tier: the vLLM adapter's arguments through the real vLLM 0.33.0 wheel's validation code, on CPU.

    ALM_VLLM_WHEEL_CACHE=/path/to/cache .venv/bin/python -m pytest -q -m slow tests/teacher/test_vllm_wheel.py

Downloads `vllm==0.33.0` (the wheel, ~340 MB, `pip download --no-deps`) and the pure-Python packages its modules
need at import into a cache folder (`$ALM_VLLM_WHEEL_CACHE`, default `~/.cache/alm/vllm-0.33.0`), outside the
environment, once; skips cleanly when that is impossible (offline). Then:

- `vllm_wheel_check.py`, in a child process with the wheel's sources on its path, runs `alm precompute` on
  `stages/demo_precompute_vllm.yaml` with vLLM's own `EngineArgs`, `SamplingParams` (and its `verify()`),
  `_params_to_seq` and `TokensPrompt` (only the engine is a CPU stand-in), and shows that the adapter's former
  request (one shared `SamplingParams`, a flat id list) is refused by that same code;
- the lines of the wheel that `vllm_standin.py` copies (the checks the default tier enforces) are pinned here, so
  the stand-in cannot drift from 0.33.0 unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WHEEL = "vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl"
# What `import vllm.sampling_params, vllm.entrypoints.llm` needs beyond alm's own environment, pinned to the
# versions this check was run with (installed with --no-deps into the cache, never into the environment)
IMPORT_DEPS = (
    "aiohappyeyeballs==2.7.1",
    "aiohttp==3.14.5",
    "aiosignal==1.4.0",
    "apache-tvm-ffi==0.1.11",
    "attrs==26.1.0",
    "cachetools==8.0.2",
    "cbor2==6.3.0",
    "cloudpickle==3.1.3",
    "fastapi==0.165.0",
    "frozenlist==1.8.0",
    "importlib-metadata==10.2.0",
    "llguidance==1.9.1",
    "msgspec==0.23.0",
    "multidict==7.2.1",
    "openai==3.57.0",
    "openai-harmony==0.0.8",
    "opentelemetry-api==1.45.2",
    "opentelemetry-exporter-otlp==1.45.2",
    "opentelemetry-exporter-otlp-proto-common==1.45.2",
    "opentelemetry-exporter-otlp-proto-grpc==1.45.2",
    "opentelemetry-exporter-otlp-proto-http==1.45.2",
    "opentelemetry-proto==1.45.2",
    "opentelemetry-sdk==1.45.2",
    "opentelemetry-semantic-conventions==0.66b2",
    "opentelemetry-semantic-conventions-ai==0.5.1",
    "partial-json-parser==0.2.1.1.post7",
    "prometheus-client==0.26.0",
    "propcache==0.5.4",
    "py-cpuinfo==9.0.0",
    "pybase64==1.5.1",
    "pyzmq==27.3.0",
    "sniffio==1.3.1",
    "starlette==1.10.0",
    "uvloop==0.23.0",
    "xgrammar==0.2.9",
    "yarl==1.25.1",
    "zipp==4.1.2",
)

# (file in the wheel's vllm/, line, text that line holds): the 0.33.0 code that vllm_standin.py and
# alm/teacher/vllm.py cite
PINNED_LINES = (
    ("config/model.py", 286, "max_logprobs: int = Field(default=20, ge=-1)"),
    ("entrypoints/common/offline.py", 253, "def _params_to_seq("),
    ("entrypoints/common/offline.py", 258, "if isinstance(params, Sequence):"),
    ("entrypoints/common/offline.py", 259, "if len(params) != num_requests:"),
    ("entrypoints/common/offline.py", 267, "return [params] * num_requests"),
    ("entrypoints/llm.py", 420, "sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,"),
    ("sampling_params.py", 392, "skip_clone: bool = False"),
    ("sampling_params.py", 922, "def _validate_logprobs(self, model_config: ModelConfig) -> None:"),
    ("sampling_params.py", 976, "if num_prompt_logprobs > max_logprobs:"),
    ("sampling_params.py", 988, "if isinstance(ids, list) and all(isinstance(row, list) for row in ids):"),
    ("sampling_params.py", 990, 'elif isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":'),
    ("sampling_params.py", 992, "if len(shape) != 2 or 0 in shape:"),
    ("sampling_params.py", 999, "max_rows = model_config.max_model_len - 1"),
    ("sampling_params.py", 1008, "if num_ids > max_logprobs:"),
    ("sampling_params.py", 1028, "if lo < -1 or hi >= vocab_size:"),
    ("sampling_params.py", 1036, "self.prompt_logprob_token_ids = np.ascontiguousarray(ids, dtype=np.int32)"),
    ("v1/engine/input_processor.py", 163, "if params.prompt_logprob_token_ids is not None:"),
    ("v1/engine/input_processor.py", 164, "if not self.vllm_config.use_v2_model_runner:"),
    ("v1/engine/input_processor.py", 464, "rows = sampling_params.prompt_logprob_token_ids"),
    ("v1/engine/input_processor.py", 467, "num_rows = max(prompt_len - 1 - start, 0)"),
    ("v1/engine/input_processor.py", 468, "if len(rows) != num_rows:"),
    ("v1/engine/logprobs.py", 366, "self.prompt_token_id_logprobs = output.prompt_token_id_logprobs.numpy()"),
    ("v1/worker/gpu/sample/prompt_logprob.py", 60, "ids = async_tensor_h2d(ids, self.device, torch.int64)"),
    ("v1/worker/gpu/sample/prompt_logprob.py", 62, "ids.clamp_min(0), ids < 0, sampling_params.prompt_logprob_start or 0"),
    ("v1/worker/gpu/sample/prompt_logprob.py", 100, "req.scores = torch.empty_like(req.token_ids, dtype=torch.float32)"),
    ("v1/worker/gpu/sample/prompt_logprob.py", 197, "else req_num_prompt_logprobs + 1"),
    ("v1/worker/gpu/sample/logprob.py", 127, "if num_logprobs > 0:"),
    ("outputs.py", 184, "prompt_token_id_logprobs: np.ndarray | None = None,"),
    ("envs.py", 638, '"VLLM_BATCH_INVARIANT": lambda: bool(int(os.getenv("VLLM_BATCH_INVARIANT", "0"))),'),
)  # fmt: skip


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def wheel_cache() -> Path:
    cache = Path(
        os.environ.get("ALM_VLLM_WHEEL_CACHE", Path.home() / ".cache" / "alm" / "vllm-0.33.0")
    )
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.exists():
        done = _pip("download", "vllm==0.33.0", "--no-deps", "-d", str(cache))
        if done.returncode != 0 or not wheel.exists():
            pytest.skip(f"cannot download vllm==0.33.0 (offline?): {done.stderr.strip()[-300:]}")
    src = cache / "src"
    if not (src / "vllm" / "sampling_params.py").exists():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(src, [n for n in archive.namelist() if n.endswith(".py")])
    deps = cache / "deps"
    marker = deps / ".alm-deps"
    if not marker.exists() or marker.read_text() != "\n".join(IMPORT_DEPS):
        done = _pip("install", "--no-deps", "--target", str(deps), "--upgrade", *IMPORT_DEPS)
        if done.returncode != 0:
            pytest.skip(f"cannot install vLLM's import dependencies: {done.stderr.strip()[-300:]}")
        marker.write_text("\n".join(IMPORT_DEPS))
    return cache


def test_the_wheels_lines_that_the_standin_copies_are_unchanged(wheel_cache):
    for name, line, text in PINNED_LINES:
        lines = (wheel_cache / "src" / "vllm" / name).read_text().splitlines()
        assert lines[line - 1].strip() == text, f"vllm/{name}:{line} is {lines[line - 1].strip()!r}"


def test_the_adapters_requests_for_a_real_recipe_pass_vllms_own_validation(wheel_cache, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            str(p) for p in (wheel_cache / "src", wheel_cache / "deps", REPO, REPO / "tests")
        ),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("vllm_wheel_check.py")), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the former request is what 0.33.0 refuses (issue 13)
    assert result["old_form_error"].startswith(
        "prompt_logprob_token_ids must be a non-empty integer array of shape [num_rows, num_ids]"
    )
    assert result["generate_signature"][:4] == ["self", "prompts", "sampling_params", "use_tqdm"]
    engine = result["engine_kwargs"]
    assert engine["max_logprobs"] == 32_128  # SmolLM2's boundary-class ids
    assert engine["max_model_len"] == 194 and engine["logprobs_mode"] == "raw_logprobs"
    assert engine["dtype"] == "bfloat16"  # `auto` for SmolLM2's fp32 checkpoint
    assert engine["enable_prefix_caching"] is False
    assert result["requests"] and result["num_generate_calls"] >= 1
    for request in result["requests"]:
        assert request["class"] == "vllm.sampling_params.SamplingParams"
        assert request["rows_shape"] == [request["prompt_len"] - 1, 32_128]
        assert request["rows_dtype"] == "int32" and request["rows_contiguous"]
        assert request["all_rows_equal"] and request["start"] == 0
        assert (request["prompt_logprobs"], request["logprobs"]) == (0, None)  # top_k: 0
    assert result["hidden_engine_args_accepted"]
    # the store written through those requests equals the HF backend's (fp32 CPU stand-in engine)
    assert result["max_abs_logp_diff"] < 1e-4
    assert result["merge_decisions_differ"] == 0
    for name, diff in result["boundary_logmass"].items():
        assert diff["num_finite_mismatch"] == 0, name
        assert diff["max"] <= 1e-2, name

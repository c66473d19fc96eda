"""Property-based fuzzing, bounded and reproducible (derandomized, a fixed number of examples each, no example
database): the HTTP API from its own OpenAPI schema (schemathesis), the CLI's argument parsing, and the --texts
JSONL reader. No input may get a 500, a traceback or an exception other than igprune's one-line error; the counts
are printed for docs/reliability.md (`pytest -s`)."""

from __future__ import annotations

import copy
import json
import urllib.request
from collections import Counter

import pytest
from test_cli_errors import run_cli
from tiny_models import tiny_tokenizer

from igprune.data import read_texts
from igprune.files import IGPruneError
from igprune.texts import ROLES

schemathesis = pytest.importorskip("schemathesis")  # with hypothesis: the dev extra on Python >= 3.11

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from test_serve import PROMPTS, TEMPLATE, TIMEOUT, alone, client_of, cluster_masks, routed_model  # noqa: E402

from igprune.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402


def bounded(examples: int):
    """Hypothesis settings for CI: a fixed count, the same examples every run, no shrinking time limit surprises."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])


TALLY: Counter = Counter()
# examples per operation and generation mode: valid and invalid bodies for POST; a GET has nothing to make invalid
API_MODES = {"POST": (60, [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]), "GET": (5, [GenerationMode.POSITIVE])}


def fuzz_schema(app) -> dict:
    """The app's OpenAPI schema with `model` pinned to the served name, max_tokens to at most 8 and the fields igprune
    refuses (n > 1, echo, ...) left out, so that most valid requests reach generation and stay quick (invalid ones
    still get every other value)."""
    raw = copy.deepcopy(app.openapi())
    for name in ("CompletionRequest", "ChatRequest"):
        fields = raw["components"]["schemas"][name]["properties"]
        fields["model"] = {"type": "string", "enum": ["tiny"]}
        fields["max_tokens"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 8}, {"type": "null"}]}
        for refused in ("n", "logprobs", "echo", "best_of", "suffix"):
            fields.pop(refused, None)
    return raw


def test_the_http_api_answers_every_generated_request_without_a_500():
    dynamic = routed_model(cluster_masks())
    dynamic.tokenizer.chat_template = TEMPLATE
    app = create_app(dynamic, "tiny", ServeSettings(max_batch=4, max_wait_ms=2, max_queue=16, request_timeout=30))
    schema = schemathesis.openapi.from_dict(fuzz_schema(app))
    with BackgroundServer(app).running() as url:
        for result in schema.get_all_operations():
            operation = result.ok()
            examples, modes = API_MODES[operation.method.upper()]
            for mode in modes:

                @bounded(examples)
                @given(case=operation.as_strategy(generation_mode=mode))
                def answered(case):
                    response = case.call(base_url=url, timeout=TIMEOUT)
                    TALLY["api requests"] += 1
                    TALLY[f"api {response.status_code // 100}xx"] += 1
                    assert response.status_code < 500, (case.body, response.text)

                answered()
        with urllib.request.urlopen(url + "/health", timeout=TIMEOUT) as response:  # healthy afterwards, and right
            assert json.loads(response.read())["status"] == "ok"
        out = client_of(url).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0)
        assert out.choices[0].text == alone(dynamic, PROMPTS[1], 8)[0]


# --- the CLI's argument parsing ------------------------------------------------------------------------------------
NOT_MODELS = ["nosuchmodel", "./nope", "/no/such/model"]  # the fuzzer never loads a model: every run ends in parsing
VALUES = st.sampled_from(["", "0", "-1", "1.5", "1e400", "nan", "-inf", "abc", "auto", "cuda:99", "gpu", "shard",
                          "cpu", "float8", ".", "..", "-", "x.json", "out", "out/sub", "a=b", "=", "[1]", "ig.json",
                          "keep", "drop", "sleb", "gguf", "hf", "--", "\u2028", "é"]) | st.text(max_size=8) \
    | st.integers(-10**20, 10**20).map(str)


def commands() -> dict[str, list]:
    """Every command by its argv path ("plot heatmap"), with its click parameters; `prepare` left out (it
    downloads), and with the --model option left to NOT_MODELS."""
    from typer.main import get_command

    from igprune.cli import app

    found, root = {}, get_command(app)
    for name, command in root.commands.items():
        for sub, leaf in getattr(command, "commands", {None: command}).items():
            found[" ".join(filter(None, [name, sub]))] = leaf.params
    found.pop("prepare")
    return found


COMMANDS = commands()


@st.composite
def argv(draw) -> list[str]:
    path = draw(st.sampled_from(sorted(COMMANDS)))
    options = [opt for p in COMMANDS[path] for opt in p.opts if opt.startswith("-") and opt not in ("-m", "--model")]
    model = ["-m", draw(st.sampled_from(NOT_MODELS))] if any("--model" in p.opts for p in COMMANDS[path]) else []
    token = st.sampled_from([*options, "--help", "--nope", "-z"]) | VALUES
    rest = draw(st.lists(token, max_size=6).filter(lambda ts: not any(t.startswith(("-m", "--model")) for t in ts)))
    return [*path.split(), *model, *rest]


@bounded(150)
@given(args=argv())
def test_any_command_line_ends_in_success_or_one_line(args, tmp_path_factory):
    code, output = run_cli(args, tmp_path_factory.mktemp("cli"))
    TALLY["cli runs"] += 1
    TALLY[f"cli exit {code}"] += 1
    assert "Traceback" not in output and code in (0, 2), (args, output)
    if code == 2:
        assert [line.startswith("igprune: error:") for line in output.splitlines() if line.strip()
                and not line.startswith("igprune: warning:")] == [True], (args, output)


# --- the --texts JSONL reader --------------------------------------------------------------------------------------
CHARS = st.characters() | st.sampled_from(["\ud800", "\udfff", "\u2028", "\x85", "\r", "\x00", "é", "{", "\""])
STRINGS = st.text(CHARS, max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | STRINGS
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(STRINGS, inner, max_size=3),
                    max_leaves=6)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "robot"]), "content": STRINGS | SCALARS})
RECORD = st.fixed_dictionaries({}, optional={"text": STRINGS | SCALARS, "prompt": STRINGS | SCALARS,
                                             "response": STRINGS | SCALARS,
                                             "messages": st.lists(MESSAGE, max_size=4) | JSON})
TURNS = st.tuples(STRINGS, STRINGS).map(lambda t: {"messages": [{"role": "user", "content": t[0]},
                                                                  {"role": "assistant", "content": t[1]}]})
WELL_FORMED = st.builds(dict, text=STRINGS) | st.builds(dict, prompt=STRINGS, response=STRINGS) | TURNS
LINE = (WELL_FORMED | RECORD).map(json.dumps) | RECORD.map(lambda r: json.dumps(r, ensure_ascii=False)) \
    | JSON.map(json.dumps) | STRINGS


@bounded(300)
@given(lines=st.lists(LINE, max_size=5), newline=st.sampled_from(["\n", "\r\n"]))
def test_any_texts_file_reads_to_texts_the_tokenizer_takes_or_one_line(lines, newline, tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    path.write_bytes(newline.join(lines).encode("utf-8", "surrogatepass"))
    tokenizer = TOKENIZER
    TALLY["texts files"] += 1
    try:
        texts = read_texts(path, tokenizer)
    except IGPruneError as err:
        TALLY["texts refused"] += 1
        assert "\n" not in str(err) and str(err).startswith(str(path))
        return
    for text in texts:
        for part in [text] if isinstance(text, str) else [s for s in text if isinstance(s, str)]:
            tokenizer(part)  # raises on text the tokenizer cannot take


TOKENIZER = tiny_tokenizer()
TOKENIZER.chat_template = TEMPLATE


def test_zz_print_fuzz_counts():
    """The fuzzers' counts, for docs/reliability.md (after them: pytest keeps file order)."""
    assert TALLY["api requests"] and TALLY["cli runs"] and TALLY["texts files"], "run the whole file to count it"
    print(f"\nreliability: fuzz: HTTP API {TALLY['api requests']} generated requests ({TALLY['api 2xx']} 2xx, "
          f"{TALLY['api 4xx']} 4xx, {TALLY['api 5xx']} 5xx); CLI {TALLY['cli runs']} generated command lines "
          f"({TALLY['cli exit 0']} exit 0, {TALLY['cli exit 2']} one-line errors, 0 tracebacks); --texts reader "
          f"{TALLY['texts files']} generated files ({TALLY['texts refused']} refused in one line)")
    assert TALLY["api 5xx"] == 0

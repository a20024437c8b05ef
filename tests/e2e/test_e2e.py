"""End to end, real parts: a trained adapter, the gateway, vLLM on the CPU, the official openai client.

The gateway runs as `lorafleet serve` in a child process, exactly as users run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import psutil
import pytest

from contract.store import AdapterStore
from tests.conftest import ORDERS, ROOT, Gateway, client

PROMPT = (
    "Generate a JSON object for a customer named Maria Garcia, email maria@shop.io, and an order ID of "
    "55121. Mark the order status as 'shipped'."
)


@pytest.fixture
def gateway(live_gateway: Gateway) -> Gateway:
    return live_gateway


def test_completion_comes_from_the_adapter(gateway: Gateway) -> None:
    resp = client(gateway).chat.completions.create(
        model="orders", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=80
    )
    assert resp.model == "orders@1"  # vLLM names the LoRA that generated it
    adapter_text = resp.choices[0].message.content
    assert adapter_text

    # The same greedy prompt on the bare base model.
    base = client(gateway).chat.completions.create(
        model="base", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=80
    )
    assert base.model == "base"
    assert base.choices[0].message.content != adapter_text


def test_the_engine_answers_only_the_gateway(gateway: Gateway) -> None:
    # vLLM's API (completions, runtime adapter loading by path) needs the key the gateway made for this start.
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}),
        ("POST", "/v1/chat/completions", {"model": "base", "messages": []}),
    ):
        resp = httpx.request(method, f"{gateway.engine_url}{path}", json=body, timeout=30)
        assert resp.status_code == 401, (path, resp.text)
        wrong = httpx.request(
            method,
            f"{gateway.engine_url}{path}",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {gateway.running.admin_key}"},
        )
        assert wrong.status_code == 401, (path, wrong.text)
    # and it does not hold the gateway's secrets: its environment is an allowlist
    engine = next(p for p in psutil.Process(gateway.proc.pid).children() if "vllm" in " ".join(p.cmdline()))
    environ = Path(f"/proc/{engine.pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    # of lorafleet's settings, only the one its vLLM plugin reads (lorafleet_vllm)
    assert {n for n in names if n.startswith("LORAFLEET_")} == {"LORAFLEET_LORA_OPS"}
    assert "VLLM_API_KEY" in names and gateway.running.admin_key.encode() not in b"".join(environ)
    assert not any(gateway.running.admin_key in part for part in engine.cmdline())


def test_streaming_gives_the_same_greedy_answer(gateway: Gateway) -> None:
    c = client(gateway)
    kwargs = dict(model="orders", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=60)
    whole = c.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
    stream = c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)  # type: ignore[call-overload]
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == whole
    assert usage is not None and usage.completion_tokens > 0


def test_the_access_log_splits_a_streams_first_token_time_between_gateway_and_engine(gateway: Gateway) -> None:
    rid = f"split-{time.time_ns()}"
    stream = client(gateway).chat.completions.create(
        model="orders",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=4,
        stream=True,
        extra_headers={"X-Request-ID": rid},
    )
    assert list(stream)
    marker = "lorafleet.access: "
    for _ in range(50):  # the line is written as the request ends, just after the client's last event
        lines = (gateway.running.data_dir / "gateway.log").read_text(errors="replace").splitlines()
        entries = [json.loads(line.split(marker, 1)[1]) for line in lines if marker in line and rid in line]
        if entries:
            break
        time.sleep(0.1)
    (entry,) = entries
    # The gateway's own work, its client writing the request to vLLM (httpx's trace), vLLM to its first event,
    # then the relay of that event: every part measured, and the first three add up to the time to first token.
    assert entry["gateway_s"] > 0 and entry["upstream_send_s"] > 0 and entry["engine_ttft_s"] > 0
    assert entry["relay_first_s"] >= 0
    parts = entry["gateway_s"] + entry["upstream_send_s"] + entry["engine_ttft_s"]
    assert parts == pytest.approx(entry["ttft_s"], abs=3e-4)


def test_bad_key_and_foreign_alias_are_openai_errors(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError) as auth:
        client(gateway, key="lf-not-a-key").models.list()
    assert auth.value.status_code == 401
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="someone-elses", messages=[{"role": "user", "content": "x"}])
    granted = httpx.get(
        f"{gateway.url}/admin/tenants/acme",
        timeout=30,
        headers={"Authorization": f"Bearer {gateway.running.admin_key}"},
    ).json()["aliases"]
    assert {"orders", "toolcall"} <= set(granted)
    assert sorted(m.id for m in client(gateway).models.list()) == sorted(granted)  # its own aliases, no others


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
STOCK = {
    "type": "function",
    "function": {
        "name": "get_stock_price",
        "description": "Get the current price of a stock",
        "parameters": {"type": "object", "properties": {"symbol": {"type": "string"}}, "required": ["symbol"]},
    },
}


def test_function_calling_through_the_sdk_tools_api(gateway: Gateway) -> None:
    """The SDK's standard tools API gets OpenAI tool_calls from an adapter trained on calls, streamed or not."""
    c = client(gateway)
    kwargs = dict(
        model="toolcall",
        messages=[{"role": "user", "content": "What is the weather in Paris right now?"}],
        tools=[WEATHER, STOCK],
        temperature=0,
        max_tokens=120,
    )
    resp = c.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name in {"get_current_weather", "get_stock_price"}
    assert isinstance(json.loads(call.function.arguments), dict)

    streamed: dict[str, str] = {"name": "", "arguments": ""}
    finish = None
    for chunk in c.chat.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            streamed["name"] += delta_call.function.name or ""
            streamed["arguments"] += delta_call.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls"
    assert streamed == {"name": call.function.name, "arguments": call.function.arguments}  # greedy: the same call

    # tool_choice naming a function: the engine is held to that function's call schema.
    named = c.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "get_stock_price"}}, **kwargs
    )  # type: ignore[call-overload]
    (forced,) = named.choices[0].message.tool_calls
    assert forced.function.name == "get_stock_price" and "symbol" in json.loads(forced.function.arguments)


def test_the_gateways_verdict_matches_an_independent_check_of_the_text(gateway: Gateway) -> None:
    """The verdict header, against jsonschema run here on the text the client got (not the judge itself)."""
    from tests.conftest import orders_schema

    validator = jsonschema.Draft202012Validator(orders_schema())
    outcomes = set()
    for i, line in enumerate((ORDERS / "test.jsonl").read_text().splitlines()[:6]):
        prompt = json.loads(line)["instruction"]
        raw = client(gateway).chat.completions.with_raw_response.create(
            model="orders",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=6 if i % 2 else 80,  # every other answer cut short: the truncated case
        )
        choice = json.loads(raw.text)["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            expected = "truncated" if finish == "length" else "invalid_json"
        else:
            expected = "valid" if validator.is_valid(parsed) else "schema_mismatch"
        assert raw.headers["x-lorafleet-json"] == expected, (text, finish)
        outcomes.add(expected)
    assert "truncated" in outcomes, outcomes


def test_a_non_streamed_request_is_aborted_when_its_client_leaves(gateway: Gateway) -> None:
    # vLLM 0.32 counts no aborts in its metrics; its running gauge and its generated-token counter show one.
    def engine(prefix: str) -> float:
        metrics = httpx.get(f"{gateway.engine_url}/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))

    before = engine("vllm:generation_tokens_total")
    body = {
        "model": "orders",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 1500 tokens
        httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json=body,
            timeout=httpx.Timeout(60, read=3),
            headers={"Authorization": f"Bearer {gateway.key}"},
        )
    deadline = time.monotonic() + 20
    while engine("vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert engine("vllm:num_requests_running") == 0
    assert engine("vllm:generation_tokens_total") - before < 1500  # stopped, not run to its 1500 tokens


def test_a_client_hanging_up_mid_stream_aborts_the_generation(gateway: Gateway) -> None:
    def running() -> float:
        metrics = httpx.get(f"{gateway.engine_url}/metrics", timeout=10).text
        return sum(
            float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")
        )

    body = {
        "model": "orders",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {gateway.key}"},
    ) as resp:
        chunks = resp.iter_lines()
        for _ in range(3):
            next(chunks)
        assert running() == 1
    deadline = time.monotonic() + 15
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert running() == 0  # 1500 tokens would take over a minute here: the engine stopped generating


def test_eval_through_the_gateway_scores_what_clients_get(gateway: Gateway, tmp_path: Path) -> None:
    data = tmp_path / "test.jsonl"
    data.write_text("".join((ORDERS / "test.jsonl").read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet",
            "eval",
            "--gateway",
            gateway.url,
            "--data",
            str(data),
            "--schema",
            str(ORDERS / "schema.json"),
            "--target",
            "orders",
            "--out",
            str(out),
            "--max-tokens",
            "80",
        ],
        cwd=ROOT,
        env=os.environ | {"LORAFLEET_API_KEY": gateway.key},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads((out / "report.json").read_text())["results"]}
    assert {r["target"] for r in rows.values()} == {"orders@1"}  # the version that answered
    constrained = rows["constrained"]  # response_format reached vLLM's structured outputs
    assert constrained["schema_valid_rate"]["successes"] + constrained["truncated_rate"]["successes"] == 4
    assert all(r["latency_p50_s"] > 0 for r in rows.values())

    denied = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet",
            "eval",
            "--gateway",
            gateway.url,
            "--data",
            str(data),
            "--target",
            "someone-elses",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=os.environ | {"LORAFLEET_API_KEY": gateway.key},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert denied.returncode == 2 and "does not serve ['someone-elses']" in denied.stderr


def test_a_crashed_engine_is_restarted_and_its_adapters_reloaded(gateway: Gateway) -> None:
    engine = next(p for p in psutil.Process(gateway.proc.pid).children() if "vllm" in " ".join(p.cmdline()))
    os.killpg(engine.pid, signal.SIGKILL)
    # While it is down, requests get 503 with Retry-After; none hangs (the client's timeout would fail the test).
    body = {"model": "orders", "messages": [{"role": "user", "content": "x"}]}
    auth = {"Authorization": f"Bearer {gateway.key}"}
    for _ in range(3):
        resp = httpx.post(f"{gateway.url}/v1/chat/completions", headers=auth, json=body, timeout=30)
        assert resp.status_code == 503 and resp.headers["retry-after"], resp.text
        time.sleep(0.5)
    deadline = time.monotonic() + 300
    status: dict = {}
    while time.monotonic() < deadline:
        admin = {"Authorization": f"Bearer {gateway.running.admin_key}"}
        resp = httpx.get(f"{gateway.url}/readyz", headers=admin, timeout=5)
        status = resp.json()
        if resp.status_code == 200 and status["engine_restarts"] >= 1:
            break
        time.sleep(1)
    assert status.get("status") == "ready" and status["engine_restarts"] == 1, status
    resp = client(gateway).chat.completions.create(
        model="orders", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=8
    )
    assert resp.model == "orders@1"


def test_hot_swap_under_load_fails_no_request(gateway: Gateway, tiny_adapter: Path) -> None:
    """20 concurrent streams run through 10 cycles of publish / promote / retire / promote back / roll back.

    Promoting back a version that is still draining must cancel its drain; after each cycle the engine's own
    adapter list is the gateway's, and holds only the stable version once the drains end.
    """
    store = AdapterStore(gateway.running.data_dir / "adapters")
    admin = httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.running.admin_key}"}, timeout=120
    )
    shutil.copytree(tiny_adapter, gateway.running.data_dir / "runs" / "orders-next")
    failures: list[str] = []
    served: set[str] = set()
    done = asyncio.Event()

    async def client_loop(c: openai.AsyncOpenAI) -> None:
        while not done.is_set():
            try:
                stream = await c.chat.completions.create(
                    model="orders", messages=[{"role": "user", "content": PROMPT}], max_tokens=6, stream=True
                )
                async for chunk in stream:
                    served.add(chunk.model)
            except Exception as exc:  # every failure is a test failure; collect them all
                failures.append(repr(exc))

    def ok(resp: httpx.Response, status: int = 200) -> dict:
        assert resp.status_code == status, resp.text
        return dict(resp.json())

    def settled(stable: str) -> dict:
        """The gateway's and the engine's adapter lists, once the retired versions have drained."""
        deadline = time.monotonic() + 60  # vLLM takes a while to unload while 20 streams keep it busy
        while True:
            ready = ok(admin.get("/readyz"))
            mine = [a for a in ready["adapters_loaded"] if a.startswith("orders@")]
            engines = [a for a in ready["engine_adapters"] if a.startswith("orders@")]
            if (mine == engines == [stable]) or time.monotonic() > deadline:
                return {"gateway": mine, "engine": engines}
            time.sleep(0.25)

    def cycles() -> list[dict]:
        seen = []
        old = store.serving("orders")
        assert old is not None
        for _ in range(10):
            new = ok(admin.post("/admin/adapters/orders/versions", json={"path": "orders-next"}), 201)["version"]
            store.record_gate(store.get("orders", new), {"passed": True})  # as `lorafleet eval --gate` would
            assert ok(admin.post("/admin/adapters/orders/promote", json={"version": new}))["loaded"]
            ok(admin.request("DELETE", f"/admin/adapters/orders/versions/{old.version}"))  # drains its requests
            time.sleep(0.3)
            back = ok(
                admin.post(
                    "/admin/adapters/orders/promote",
                    json={"version": old.version, "force": True, "reason": "manual rollback"},
                )
            )
            assert back["loaded"]
            time.sleep(0.3)
            ok(admin.request("DELETE", f"/admin/adapters/orders/versions/{new}"))  # the new version rolled back
            seen.append(settled(old.ref) | {"new": f"orders@{new}"})
        return seen

    async def run() -> list[dict]:
        c = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.key, max_retries=0, timeout=300)
        clients = [asyncio.create_task(client_loop(c)) for _ in range(20)]
        try:
            return await asyncio.to_thread(cycles)
        finally:
            done.set()
            await asyncio.gather(*clients)

    stable = store.serving("orders")
    assert stable is not None
    after_each = asyncio.run(run())
    assert failures == []
    assert len(served) >= 3, served  # traffic really moved across versions
    for cycle in after_each:
        assert cycle["gateway"] == cycle["engine"] == [stable.ref], after_each


def test_ctrl_c_drains_in_flight_requests_then_stops_every_child(gateway: Gateway) -> None:
    children = psutil.Process(gateway.proc.pid).children(recursive=True)
    assert any("vllm" in " ".join(p.cmdline()) for p in children)
    stream = client(gateway).chat.completions.create(
        model="orders",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)  # the request is in flight
    gateway.proc.send_signal(signal.SIGINT)
    rest = list(chunks)  # ...and still runs to its end
    finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason]
    usage = next(c.usage for c in reversed(rest) if c.usage)
    assert finish == ["length"] and usage.completion_tokens == 48
    with pytest.raises(httpx.ConnectError):  # no new work is taken while draining or after
        httpx.get(f"{gateway.url}/healthz", timeout=5)
    assert gateway.proc.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]

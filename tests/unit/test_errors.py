"""The error catalogue: every code the API answers with is in it, every code in it is answered somewhere, and
docs/api.md's table is the catalogue."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.errors import BEGIN, END, APIError, ErrorCode, ErrorResponse, error_body, error_type, markdown_table
from tests.conftest import ROOT

API_DOC = ROOT / "docs" / "api.md"


def documented() -> str:
    text = API_DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)]


def test_the_api_docs_table_is_the_catalogue() -> None:
    """Both ways: a code added to the catalogue and not the docs, or documented and gone, fails here."""
    assert documented() == markdown_table(), "regenerate it: python -m serving.errors --update docs/api.md"
    in_docs = set(re.findall(r"^\| `([a-z_]+)` \|", documented(), re.M))
    assert in_docs == {code.value for code in ErrorCode}


def test_python_m_serving_errors_prints_the_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "serving.errors"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout == markdown_table()


def serving_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "serving").rglob("*.py")}


def test_every_code_in_the_catalogue_is_answered_somewhere() -> None:
    used = {
        node.attr
        for name, text in serving_sources().items()
        if name != "serving/errors.py"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ErrorCode"
    }
    unused = [code.name for code in ErrorCode if code.name not in used]
    assert not unused, f"codes nothing raises (remove them, or raise them): {unused}"


def test_no_error_is_raised_with_a_code_outside_the_catalogue() -> None:
    """Every ``APIError``/``CanaryError``/``error_body`` call names an ``ErrorCode`` member, never a string."""
    loose = []
    for name, text in serving_sources().items():
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if called in ("APIError", "CanaryError"):
                code = node.args[0] if node.args else None
            elif called in ("error_body", "_refuse") and len(node.args) >= 3:
                code = node.args[2] if called == "error_body" else (node.args[3] if len(node.args) > 3 else None)
            else:
                continue
            given = [code, *(k.value for k in node.keywords if k.arg == "code")]
            if any(isinstance(c, ast.Constant) and c.value is not None for c in given):
                loose.append(f"{name}:{node.lineno} {ast.unparse(node)[:80]}")
    assert not loose, "codes given as literals:\n" + "\n".join(loose)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_each_code_has_its_status_type_and_meaning(code: ErrorCode) -> None:
    assert 400 <= code.status < 600 and code.type == error_type(code.status)
    assert code.meaning and not code.meaning.startswith(" ") and len(code.meaning) <= 100
    assert ErrorCode(code.value) is code and list(ErrorCode).count(code) == 1
    error = APIError(code, "what happened")
    assert (error.status, error.code, error.message) == (code.status, code, "what happened")


def test_every_member_declared_is_its_own_code() -> None:
    """Two members declared with one code would silently be one (an enum alias), the second's status and meaning
    lost: every assignment in the class is a member of its own."""
    tree = ast.parse((ROOT / "serving" / "errors.py").read_text())
    [catalogue] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ErrorCode"]
    declared = [n.targets[0].id for n in catalogue.body if isinstance(n, ast.Assign)]  # type: ignore[attr-defined]
    assert declared == [code.name for code in ErrorCode]


def test_the_body_is_openais_error_shape() -> None:
    body = error_body(404, "No such model.", ErrorCode.MODEL_NOT_FOUND, "model")
    assert body == {
        "error": {"message": "No such model.", "type": "not_found_error", "param": "model", "code": "model_not_found"}
    }
    assert ErrorResponse.model_validate(body).error.code == "model_not_found"
    assert error_body(500, "x")["error"] == {"message": "x", "type": "server_error", "param": None, "code": None}
    assert APIError(ErrorCode.ENGINE_REJECTED, "too long", status=413).status == 413  # a code that passes one on


def test_the_frameworks_own_errors_get_catalogue_codes(tmp_path: Path) -> None:
    """No route, or the wrong method: FastAPI's own 404 and 405 carry a code from the catalogue too."""
    from serving.app import build_app
    from serving.config import GatewaySettings
    from tests.fakes import FakeEngine, fake_base

    settings = GatewaySettings(data_dir=tmp_path, admin_key="k" * 32, base_model=str(fake_base(tmp_path)))
    with TestClient(build_app(settings, FakeEngine())) as client:
        missing, wrong = client.get("/v1/nothing"), client.get("/v1/chat/completions")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "unknown_route")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")

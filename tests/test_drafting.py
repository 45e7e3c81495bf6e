"""`story draft`: the camp's template sent to a loopback chat-completions server through the real
`openai` client; good and bad answers, 401, timeout, offline, no key; the key never leaks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kolors_lib.cli.main import main
from kolors_lib.kolors.story import load_story
from kolors_lib.storyboard.drafting import framing_for, parse_answer, template_prompt

KEY = "ms-secret-7f3a9c"  # a fake key: it must never appear in output or files
ENV = "TEST_CHAT_KEY"
SCENES = ["女主正在上课", "开始睡着了", "进入梦乡，梦到自己站在路旁", "王子骑马而来", "两人相谈甚欢",
          "一起坐在马背上", "下课了，梦醒了", "又回到了学习生活中"]
GOOD = [f"古风，水墨画，一个黑色长发少女，{s}，{'全身' if i % 2 else '上半身'}，绿色长裙" for i, s in enumerate(SCENES)]


class ChatServer(ThreadingHTTPServer):
    """Speaks POST /v1/chat/completions; `mode` picks the answer; requests are recorded."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.mode = "good"
        self.requests: list[dict] = []
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        mode = self.server.mode
        if mode == "401":  # echoes the key, as some servers do: we must not print it
            return self._send(401, {"error": {"message": f"invalid token {KEY}", "type": "invalid_request_error",
                                              "code": "invalid_api_key"}})
        if mode == "slow":
            self.server.release.wait(10)
        content = {"good": "```json\n" + json.dumps(GOOD, ensure_ascii=False) + "\n```",
                   "malformed": "抱歉，我不能完成这个请求。",
                   "wrong_count": json.dumps(GOOD[:7], ensure_ascii=False),
                   "english": json.dumps([f"ancient style, a girl, scene {i}" for i in range(8)]),
                   "slow": json.dumps(GOOD, ensure_ascii=False)}[mode]
        self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture(scope="module")
def server() -> Iterator[ChatServer]:
    srv = ChatServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    path = tmp_path / "scenes.txt"
    path.write_text("# my story\n" + "\n".join(SCENES) + "\n\n", encoding="utf-8")
    return path


def draft(scenes: Path, server: ChatServer, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["story", "draft", str(scenes), "--base-url", server.url, "--model", "Qwen/test",
                 "--api-key-env", ENV, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def no_key_anywhere(folder: Path, *texts: str) -> None:
    assert all(KEY not in t for t in texts)
    for path in folder.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_good_answer_becomes_the_story_file(scenes: Path, server: ChatServer, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    server.mode, server.requests[:] = "good", []
    code, out, err = draft(scenes, server, capsys)
    path = scenes.with_name("scenes.story.yaml")
    assert code == 0 and err == "" and out == f"story: {path} (drafted by the LLM)\n"
    story = load_story(path)
    assert [s.prompt for s in story.scenes] == GOOD and [s.scene for s in story.scenes] == SCENES
    assert [s.seed for s in story.scenes] == list(range(1, 9)) and story.negative.startswith("现代风格")
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "Qwen/test"
    sent = request["body"]["messages"][0]["content"]
    assert sent == template_prompt(SCENES)
    assert "1、女主正在上课\n2、开始睡着了" in sent and "8、又回到了学习生活中" in sent
    assert all(rule in sent for rule in ("风格为古风", "全身还是上半身", "人物描述", "场景描述", "做啥事情", "例子"))
    no_key_anywhere(scenes.parent, out, err)


@pytest.mark.parametrize(("mode", "why"), [("malformed", "neither a JSON list nor numbered lines"),
                                           ("wrong_count", "has 7 prompts for 8 scenes"),
                                           ("english", "prompt 1 is not in Chinese")])
def test_a_bad_answer_falls_back_to_the_template_rules(mode: str, why: str, scenes: Path, server: ChatServer,
                                                      capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    server.mode = mode
    out_file = scenes.parent / "mine.yaml"
    code, out, err = draft(scenes, server, capsys, "--out", str(out_file))
    assert code == 0 and out == f"story: {out_file} (from the template rules)\n"
    assert err.count("\n") == 1 and err.startswith(f"note: unusable answer from {server.url}: ") and why in err
    story = load_story(out_file)
    assert story.scenes[3].prompt == "古风，水墨画，王子骑马而来，全身"
    assert story.scenes[0].prompt == "古风，水墨画，女主正在上课，上半身"
    no_key_anywhere(scenes.parent, out, err)


def test_a_refused_key_says_401_without_the_key(scenes: Path, server: ChatServer, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    server.mode = "401"
    code, out, err = draft(scenes, server, capsys)
    assert code == 0 and err == (f"note: {server.url} refused the key in ${ENV} (HTTP 401); "
                                 "wrote a story composed from the template's rules instead\n")
    assert len(load_story(scenes.with_name("scenes.story.yaml")).scenes) == 8
    no_key_anywhere(scenes.parent, out, err)


def test_a_silent_endpoint_times_out_in_bounded_time(scenes: Path, server: ChatServer, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    server.mode = "slow"
    start = time.monotonic()
    code, out, err = draft(scenes, server, capsys, "--timeout", "1")
    assert time.monotonic() - start < 4, "one try, no retries"
    assert code == 0 and err.startswith(f"note: {server.url} did not answer within 1 s")
    assert len(load_story(scenes.with_name("scenes.story.yaml")).scenes) == 8


def test_offline_and_no_key_write_the_template_story(scenes: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(ENV, KEY)
    code = main(["story", "draft", str(scenes), "--base-url", f"http://127.0.0.1:{port}/v1", "--api-key-env", ENV])
    out, err = capsys.readouterr()
    assert code == 0 and err.startswith(f"note: cannot reach http://127.0.0.1:{port}/v1 (offline?)")
    monkeypatch.delenv(ENV)
    code = main(["story", "draft", str(scenes), "--api-key-env", ENV, "--force"])
    out2, err2 = capsys.readouterr()
    assert code == 0 and err2.startswith(f"note: no API key in ${ENV};") and err2.count("\n") == 1
    raw = scenes.with_name("scenes.story.yaml").read_text(encoding="utf-8")
    assert "style:" in raw and "characters: {}" in raw and "framing: 全身" in raw
    no_key_anywhere(scenes.parent, out, err, out2, err2)


def test_an_existing_story_is_kept_and_a_bad_scene_list_is_one_line(scenes: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    target = scenes.with_name("scenes.story.yaml")
    target.write_text("my edits", encoding="utf-8")
    assert main(["story", "draft", str(scenes), "--api-key-env", ENV]) == 2
    assert capsys.readouterr().err == f"error: {target} exists (your edits?); pass --force to replace it or --out " \
                                      "another file\n"
    assert target.read_text(encoding="utf-8") == "my edits"
    short = scenes.with_name("short.txt")
    short.write_text("\n".join(SCENES[:7]), encoding="utf-8")
    assert main(["story", "draft", str(short), "--api-key-env", ENV]) == 2
    assert capsys.readouterr().err == f"error: {short}: expected 8 scenes, one per line, found 7\n"


def test_answer_parsing_and_framing_rule() -> None:
    numbered = "\n".join(f"{i}、{p}" for i, p in enumerate(GOOD, start=1))
    assert parse_answer(numbered, 8) == GOOD
    assert parse_answer("好的：\n" + json.dumps(GOOD, ensure_ascii=False), 8) == GOOD
    with pytest.raises(ValueError, match="prompt 3 is empty"):
        parse_answer(json.dumps([*GOOD[:2], " ", *GOOD[3:]], ensure_ascii=False), 8)
    with pytest.raises(ValueError, match="empty"):
        parse_answer(None, 8)
    # the camp chose 全身 for scene 8 too: the keyword rule is a first draft, to edit
    assert [framing_for(s) for s in SCENES] == ["上半身", "上半身", "全身", "全身", "上半身", "全身", "上半身",
                                                "上半身"]

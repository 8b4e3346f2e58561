"""Request bodies checked without a server: what a good body becomes, and the exact sentence, status
and field of every refusal."""

from __future__ import annotations

import json

import pytest

from lorakit.serve.schemas import ApiError, GenerationRequest, parse_generation, parse_load, parse_unload

USER = [{"role": "user", "content": "hi"}]
CHAT_ACCEPTS = ("this endpoint accepts max_completion_tokens, max_tokens, messages, model, seed, stop, "
                "stream, stream_options, temperature, top_p")
COMPLETION_ACCEPTS = ("this endpoint accepts max_tokens, model, prompt, seed, stop, stream, stream_options, "
                      "temperature, top_p")
STOP_RULE = "field 'stop' must be a non-empty string or a list of at most 4 non-empty strings"
ONE_PROMPT = "this server takes one prompt string per request (token-id prompts are not supported)"


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def chat(**fields) -> GenerationRequest:
    return parse_generation(body(**{"model": "a0", "messages": USER, **fields}), chat=True)


def refusal(raw: bytes, chat: bool = True) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_generation(raw, chat)
    return caught.value


def test_a_chat_body_with_defaults():
    assert chat() == GenerationRequest(model="a0", chat=True, prompt=None, messages=USER, max_tokens=None,
                                       temperature=1.0, top_p=1.0, seed=None, stop=[], stream=False,
                                       include_usage=False)


def test_a_chat_body_with_every_field():
    request = chat(max_tokens=5, max_completion_tokens=9, temperature=0, top_p=0.5, seed=3, stop="##",
                   stream=True, stream_options={"include_usage": True}, user="u1",
                   messages=[{"role": "system", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "hel"},
                                                          {"type": "text", "text": "lo"}]}])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert request == GenerationRequest(model="a0", chat=True, messages=messages, max_tokens=9,
                                        temperature=0.0, top_p=0.5, seed=3, stop=["##"], stream=True,
                                        include_usage=True)
    assert type(request.temperature) is float  # an integer 0 in JSON is still a float here


def test_a_completion_body_takes_one_prompt_alone_or_in_a_list():
    for prompt in ("one two", ["one two"]):
        request = parse_generation(body(model="m", prompt=prompt, stop=["a", "b"], max_tokens=4), chat=False)
        got = (request.prompt, request.chat, request.stop, request.max_tokens)
        assert got == ("one two", False, ["a", "b"], 4)


def test_neutral_values_and_nulls_are_accepted():
    request = chat(n=1, best_of=1, logprobs=False, top_logprobs=0, presence_penalty=0, frequency_penalty=0.0,
                   logit_bias={}, tools=[], tool_choice="none", parallel_tool_calls=True,
                   response_format={"type": "text"}, temperature=None, stop=None, frobnicate=None)
    assert (request.temperature, request.stop) == (1.0, [])


@pytest.mark.parametrize("fields, param, message", [
    (dict(max_tokens="abc"), "max_tokens", "field 'max_tokens' must be an integer, got string \"abc\""),
    (dict(max_tokens=True), "max_tokens", "field 'max_tokens' must be an integer, got boolean true"),
    (dict(max_tokens=2.5), "max_tokens", "field 'max_tokens' must be an integer, got number 2.5"),
    (dict(max_tokens=0), "max_tokens", "max_tokens must be at least 1, got 0"),
    (dict(max_completion_tokens=-2), "max_tokens", "max_tokens must be at least 1, got -2"),
    (dict(temperature="hot"), "temperature", "field 'temperature' must be a number, got string \"hot\""),
    (dict(temperature=2.5), "temperature", "temperature must be between 0 and 2, got 2.5"),
    (dict(temperature=-0.1), "temperature", "temperature must be between 0 and 2, got -0.1"),
    (dict(top_p=1.5), "top_p", "top_p must be between 0 and 1, got 1.5"),
    (dict(top_p=0), "top_p", "top_p must be in (0, 1], got 0"),
    (dict(seed=False), "seed", "field 'seed' must be an integer, got boolean false"),
    (dict(stream=1), "stream", "field 'stream' must be a boolean, got integer 1"),
    (dict(stop=[1]), "stop", f"{STOP_RULE}, got [1]"),
    (dict(stop=""), "stop", f"{STOP_RULE}, got \"\""),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", f"{STOP_RULE}, got [\"a\", \"b\", \"c\", \"d\", \"e\"]"),
    (dict(stream_options={"include_usage": True}), "stream_options",
     "stream_options is only allowed with stream: true"),
    (dict(stream=True, stream_options={"chunk": 1}), "stream_options",
     "unsupported stream_options ['chunk']; accepted: include_usage"),
    (dict(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage",
     "field 'stream_options.include_usage' must be a boolean, got string \"yes\""),
    (dict(n=2), "n", "n=2 is not supported by this server; leave n out (or at 1)"),
    (dict(n=True), "n", "n=true is not supported by this server; leave n out (or at 1)"),
    (dict(logprobs=True), "logprobs", "logprobs=true is not supported by this server; leave logprobs out "
                                      "(or at false)"),
    (dict(presence_penalty=0.5), "presence_penalty", "presence_penalty=0.5 is not supported by this server; "
                                                     "leave presence_penalty out (or at 0)"),
    (dict(response_format={"type": "json_object"}), "response_format",
     "response_format={\"type\": \"json_object\"} is not supported by this server; leave response_format out "
     "(or at {\"type\": \"text\"})"),
    (dict(frobnicate=1), "frobnicate", f"unsupported field 'frobnicate'; {CHAT_ACCEPTS}"),
    (dict(prompt="x"), "prompt", f"unsupported field 'prompt'; {CHAT_ACCEPTS}"),
    (dict(messages=[]), "messages", "field 'messages' must be a non-empty list of messages, got list"),
    (dict(messages="hi"), "messages", "field 'messages' must be a non-empty list of messages, got string"),
    (dict(messages=["hi"]), "messages[0]",
     "messages[0] must be an object with 'role' and 'content', got string"),
    (dict(messages=[*USER, {"role": "tool", "content": "x"}]), "messages[1].role",
     "messages[1].role 'tool' is not supported; accepted: system, developer, user, assistant "
     "(tool calls are not implemented)"),
    (dict(messages=[{"content": "x"}]), "messages[0].role", "field 'messages[0].role' is required"),
    (dict(messages=[{"role": "user", "content": "x", "name": "bob"}]), "messages[0].name",
     "messages[0].name is not supported; a message has 'role' and 'content'"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]),
     "messages[0].content", "messages[0].content must be a string or a list of text parts, got "
     "[{\"type\": \"image_url\", \"image_url\": \"u\"}] (images and audio are not supported)"),
])
def test_chat_refusals_name_the_field_and_the_value(fields, param, message):
    err = refusal(body(**{"model": "a0", "messages": USER, **fields}))
    assert (err.status, err.param, err.message) == (400, param, message)
    assert err.body() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                    "code": 400}}


@pytest.mark.parametrize("fields, param, message", [
    (dict(prompt=["a", "b"]), "prompt", f"field 'prompt' holds 2 entries; {ONE_PROMPT}"),
    (dict(prompt=[1, 2, 3]), "prompt", f"field 'prompt' holds 3 entries; {ONE_PROMPT}"),
    (dict(prompt=5), "prompt", "field 'prompt' must be a string, got integer"),
    (dict(prompt=""), "prompt", "field 'prompt' is empty; give some text to continue"),
    (dict(messages=USER), "messages", f"unsupported field 'messages'; {COMPLETION_ACCEPTS}"),
    (dict(max_completion_tokens=3), "max_completion_tokens",
     f"unsupported field 'max_completion_tokens'; {COMPLETION_ACCEPTS}"),
])
def test_completion_refusals_name_the_field_and_the_value(fields, param, message):
    err = refusal(body(model="a0", **{"prompt": "hi", **fields}), chat=False)
    assert (err.status, err.param, err.message) == (400, param, message)


def test_a_missing_model_and_bodies_that_are_not_json_objects():
    err = refusal(body(messages=USER))
    assert (err.param, err.message) == ("model", "field 'model' is required")
    err = refusal(b"[1, 2]")
    assert (err.status, err.param) == (400, None)
    assert err.message == "the request body must be a JSON object, got list"
    err = refusal(b'{"model": "a0", ')
    assert err.status == 400 and err.message.startswith("the request body is not valid JSON (")
    assert err.message.endswith("); send a JSON object")
    err = refusal(b'{"model": "a0", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert (err.param, err.message) == ("temperature", "temperature must be between 0 and 2, got nan")


def test_completions_accept_logprobs_zero():
    assert parse_generation(body(model="a0", prompt="hi", logprobs=0), chat=False).prompt == "hi"


def test_adapter_route_bodies():
    assert parse_load(body(lora_name="sql", lora_path="runs/sql")) == ("sql", "runs/sql")
    assert parse_load(body(lora_name="sql", lora_path="p", load_inplace=False)) == ("sql", "p")
    assert parse_unload(body(lora_name="sql", lora_int_id=3)) == "sql"
    for parse, raw, param, message in [
        (parse_load, body(lora_name="x", lora_path="p", load_inplace=True), "load_inplace",
         "load_inplace=true is not supported; unload the adapter, then load it again"),
        (parse_load, body(lora_name="x"), "lora_path", "field 'lora_path' is required"),
        (parse_load, body(lora_name="  ", lora_path="p"), "lora_name", "lora_name must not be empty"),
        (parse_load, body(lora_name="x", lora_path="p", base="b"), "base",
         "unsupported field 'base'; this endpoint accepts load_inplace, lora_name, lora_path"),
        (parse_unload, body(lora_name=3), "lora_name", "field 'lora_name' must be a string, got integer 3"),
        (parse_unload, body(name="x"), "name",
         "unsupported field 'name'; this endpoint accepts lora_int_id, lora_name"),
    ]:
        with pytest.raises(ApiError) as caught:
            parse(raw)
        assert (caught.value.status, caught.value.param, caught.value.message) == (400, param, message)

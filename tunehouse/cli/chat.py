"""Using fine-tuned models: the quick-start walk-through, terminal chat and model comparison."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunehouse.cli.common import ApiKey, BaseUrl, HomeDir, JsonOut, client_for, console, err, fail, settings_for
from tunehouse.client import ApiError, Client


def quickstart(home: HomeDir = None,
               coqa: Annotated[Optional[Path], typer.Option("--coqa", help="A real CoQA JSON file to use instead "
                                                            "of the generated stories.")] = None,
               model: Annotated[Optional[str], typer.Option(help="Base model (default SmolLM2-135M-Instruct).")] = None,
               small: Annotated[bool, typer.Option("--small", help="Tiny test model, few stories and steps "
                                                   "(under a minute).")] = False):
    """The end-to-end walk-through on an embedded server: data → check → upload → LoRA SFT (live) →
    base vs fine-tuned evaluation → DPO from the SFT job → how to chat with the result."""
    from tunehouse import quickstart as qs

    qs.run(settings_for(home), small=small, model=model, coqa_file=coqa)


# -- chat -----------------------------------------------------------------------------------
def chat(model: Annotated[str, typer.Argument(help="A base model or one of your fine-tuned models.")],
         system: Annotated[Optional[str], typer.Option(help="System prompt for the conversation.")] = None,
         max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 512,
         temperature: Annotated[float, typer.Option(help="0 = greedy; higher = more varied.")] = 0.7,
         base_url: BaseUrl = None, api_key: ApiKey = None):
    """Chat with a model in the terminal; replies stream in as they are generated. The whole
    conversation is sent each turn; `/exit` (or end of input) quits."""
    client = client_for(base_url, api_key)
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        console.print(f"Chatting with [bold]{model}[/bold]; /exit to quit.")
    while True:
        if interactive:
            console.print("[bold green]you>[/bold green] ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        if interactive:
            console.print(f"[bold blue]{model}>[/bold blue] ", end="")
        try:
            reply = _stream_reply(client, {"model": model, "messages": messages, "max_tokens": max_tokens,
                                           "temperature": temperature, "stream": True})
        except ApiError as exc:
            fail(exc)
        messages.append({"role": "assistant", "content": reply})


def _stream_reply(client: Client, body: dict) -> str:
    """POST a streamed chat completion, print the text as it arrives, return all of it."""
    import httpx

    reply = []
    try:
        with client.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(resp.status_code, resp.json().get("error", {}).get("message", resp.text), {})
            for line in resp.iter_lines():
                data = line.removeprefix("data: ")
                if not line.startswith("data: ") or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ApiError(500, chunk["error"]["message"], chunk)
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") or ""
                    reply.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
    except httpx.ConnectError as exc:
        raise ApiError(0, f"Cannot reach the tunehouse server at {client.base_url} ({exc}). "
                          "Start it with `tunehouse serve` or pass --base-url.") from None
    sys.stdout.write("\n")
    return "".join(reply)


# -- eval ----------------------------------------------------------------------------------------
def eval_models(model: Annotated[list[str], typer.Option("--model", help="A model to compare; repeat the flag "
                                                         "for each (the first is the baseline).")],
                file: Annotated[Path, typer.Option("--file", help="Held-out chat JSONL; every assistant turn "
                                                   "is asked with the gold history before it.")],
                out: Annotated[Path, typer.Option("--out", help="Folder for eval.json and eval.svg.")] = Path("eval"),
                base_url: BaseUrl = None, api_key: ApiKey = None,
                max_tokens: Annotated[int, typer.Option(min=1, help="Answer length cap, tokens.")] = 32,
                concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
                json_out: JsonOut = False):
    """Compare models on a held-out chat file through /v1/chat/completions (any compatible server):
    exact match and token F1 of greedy answers, validation loss and perplexity; writes eval.json
    and an SVG bar chart."""
    from tunehouse.evaluate import compare

    client = client_for(base_url, api_key)  # resolves the URL and key as every other command does
    try:
        result = compare.compare(model, file, base_url=client.base_url, api_key=client.api_key,
                                 max_tokens=max_tokens, concurrency=concurrency, console=None if json_out else err)
        evaluation_id = _post_result(client, result)
    except compare.CompareError as exc:
        err.print(f"[red]Error:[/red] {exc}")
        raise typer.Exit(1)
    finally:
        client.close()
    json_path, svg_path = compare.write_outputs(result, out)
    if json_out:
        print(json.dumps({"models": result["models"], "json": str(json_path), "svg": str(svg_path),
                          "evaluation_id": evaluation_id}, indent=2))
        return
    console.print(compare.results_table(result))
    console.print(f"Wrote {json_path} and {svg_path}"
                  + (f"; stored on the server as {evaluation_id} (dashboard: Evaluations)" if evaluation_id else ""))


def _post_result(client, result: dict) -> str | None:
    """Store the summary on the server so its dashboard shows it. Another OpenAI-compatible server
    has no /v1/evaluations: the result then stays local (None)."""
    body = {"file": result["file"], "max_tokens": result["max_tokens"], "models": result["models"]}
    try:
        return client.request("POST", "/v1/evaluations", json=body)["id"]
    except ApiError as exc:
        err.print(f"[yellow]Not stored on the server:[/yellow] {exc}")
        return None

"""OpenAI-compatible chat completions."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from medserve.errors import OperationNotSupportedError
from medserve.gateway.audit_scope import sha256_hex
from medserve.gateway.state import GatewayState, get_gateway, json_body_schema, parse_json_body, provenance_headers
from medserve.protocols.openai import ChatCompletionRequest, ChatCompletionResponse

router = APIRouter(tags=["llm"])


@router.post("/v1/chat/completions", openapi_extra=json_body_schema(ChatCompletionRequest))
async def chat_completions(request: Request, gateway: GatewayState = Depends(get_gateway)) -> JSONResponse:
    async with gateway.recorder.scope("chat.completions", None, request.headers) as audit:
        audit.principal = await gateway.principal(request)
        body = await gateway.read_body(request)
        audit.input_sha256 = sha256_hex(body)
        chat = parse_json_body(ChatCompletionRequest, body)
        audit.model_name = chat.model
        entry = gateway.authorize_model(audit.principal, chat.model, task="llm")
        entry = await gateway.route(entry, audit)
        if chat.stream:
            raise OperationNotSupportedError("streaming is not available yet", model=entry.model_name)
        params = {
            "max_tokens": chat.token_budget(entry.max_output_tokens),
            "temperature": chat.temperature,
            "top_p": chat.top_p,
            "stop": chat.stop_list(),
            "seed": chat.seed,
        }
        messages = [message.model_dump(exclude_none=True) for message in chat.messages]
        result = await gateway.call(entry, "chat", {"messages": messages, "params": params}, audit=audit)
        audit.output_sha256 = result["output_sha256"]
        audit.prompt_tokens = result["prompt_tokens"]
        audit.completion_tokens = result["completion_tokens"]
        response = ChatCompletionResponse(
            model=entry.model_name,
            choices=[
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result["text"]},
                    "finish_reason": result["finish_reason"],
                }
            ],
            usage={
                "prompt_tokens": result["prompt_tokens"],
                "completion_tokens": result["completion_tokens"],
                "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
            },
            system_fingerprint=f"{entry.model_name}@{entry.model_version}",
            medserve={
                "inference_id": str(audit.id),
                "model_version": entry.model_version,
                "artifact_sha256": entry.artifact_sha256,
            },
        )
    return JSONResponse(response.model_dump(), headers=provenance_headers(str(audit.id), entry))

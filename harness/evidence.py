"""What a check needs to see, and which option supplies it.

A check names its evidence; a deployment that cannot give it makes the check skip with a reason
that says exactly what is missing and how to supply it, never a pass or a failure on a guess.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Evidence:
    key: str
    what: str  # what the check needs to see
    supply: str  # the option (or deployment) that would supply it

    def lacking(self, detail: str = "") -> str:
        return f"needs {self.what}{': ' + detail if detail else ''}; {self.supply}"


CACHE = Evidence("cache", "a metadata cache and the cards its frontend resolved",
                 "give --cache-root DIR with --discovery file://STORE or --card FILE")
SOURCE_DIR = Evidence("source_dir", "the card's source model dir, readable from here",
                      "run the suite on a host that mounts the worker's model path")
FRONTEND = Evidence("frontend", "a frontend to send requests to", "give --frontend-url URL and --model NAME")
TOKEN_IDS = Evidence("token_ids", "token ids in the frontend's responses",
                     "the frontend must accept return_token_ids (vLLM) or nvext.extra_fields completion_token_ids "
                     "(Dynamo); this one accepted neither")
ROUTING_HEADERS = Evidence("routing_headers", "the frontend's routing decision per response (an x-disagg-mode header, "
                           "or Dynamo's nvext.worker_id)", "the frontend must report which workers served a request")
ENGINE_REQUEST_IDS = Evidence("engine_request_ids", "the request ids prefill and decode engines ran under "
                              "(x-disagg-{prefill,decode}-engine-request-id headers)",
                              "the frontend must report them in x-disagg-* headers")
AGGREGATED_REFERENCE = Evidence("aggregated_reference", "an aggregated engine serving the same model, as the "
                                "reference for output equality", "give --engine-url aggregated=URL")
PREFILL_WORKER = Evidence("prefill_worker", "a disaggregated deployment: a prefill worker behind the frontend",
                          "point the suite at a deployment with prefill workers (its --discovery records or "
                          "--engine-url prefill=URL show them); this one shows aggregated workers only")
ENGINE_CONTROL = Evidence("engine_control", "the power to stop, kill and restart engines",
                          "only the embedded deployment grants it (run without --frontend-url)")
PLANTED_ROUTER = Evidence("planted_router", "a harness router with a planted bug in front of the deployment's "
                          "engines", "only the embedded deployment grants it (run without --frontend-url)")
HARNESS_CODE = Evidence("harness_code", "the harness's own code (card builder, URI rungs, resolver fault "
                        "injection); it tests the reference implementation, not the deployment under test",
                        "run without --card/--discovery/--frontend-url to test the harness itself")


STORE_CONTROL = Evidence("store_control", "the power to stop and restart the deployment's discovery store (etcd)",
                         "only the embedded deployment on an etcd of its own grants it (--embedded-store=etcd)")
ENGINE_OPENAI = Evidence("engine_openai", "an engine's own OpenAI server, to warm its prefix cache without the frontend",
                         "give --engine-url ROLE=URL of the engine's OpenAI server (a Dynamo worker's DYN_SYSTEM_PORT "
                         "serves /metrics only)")
INTERPOSED = Evidence("interposed", "the suite's own relays between the router and its prefill and decode engines "
                      "(what the router sent each engine; a broken worker on command)",
                      "give --frontend-cmd TEMPLATE (the suite starts the router in front of its relays), or run "
                      "`python -m harness interpose` and give --interposed ROLE=CONTROL_URL")


FRONTEND_METRICS = Evidence("frontend_metrics", "the frontend's own Prometheus /metrics with a count of the requests "
                            "it has in flight", "give --frontend-metrics-url URL where they are not on --frontend-url "
                            "(vllm-router serves them on its --prometheus-port; with --frontend-cmd, use {metrics_port})")


def engine_metrics(role: str) -> Evidence:
    return Evidence(f"metrics:{role}", f"the {role} engine's /metrics", f"give --engine-url {role}=URL "
                    f"(for Dynamo workers: their DYN_SYSTEM_PORT status server)")

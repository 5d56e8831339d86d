"""hello_world: the example PyWorker, for an LLM server with two routes.

The model API (at http://127.0.0.1:5001 unless MODEL_SERVER_URL says otherwise):

    POST /generate         {"prompt": str, "max_response_tokens": int | null} -> JSON
    POST /generate_stream  the same, answered as a stream, one token per chunk

This worker exposes the same two routes. Clients send {"auth_data": ..., "payload": ...};
pyworker checks the signature, and this file says how to read the payload, how much work it
is, and how to relay the model's answer. To write a worker for another model, copy this
file and change the four parts below: the payload, the handlers, the log actions, the routes.

    MODEL_LOG=/var/log/model.log python hello_world.py
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

import pyworker
from pyworker import ApiPayload, Backend, EndpointHandler, LogAction, post

MODEL_SERVER_URL = "http://127.0.0.1:5001"

# 1. The payload ##################################################################################

# Common English words, to build random test prompts offline (the seed downloaded nltk's list).
WORDS = """
the of and to in is was that for it with as his on be at by had are but from or have an they
which one you were her all she there would their we him been has when who will more no if out
so said what up its about into than them can only other new some could time these two may
then do first any my now such like our over man me even most made after also did many before
must through back years where much your way well down should because each just those people
how too little state good very make world still own see men work long get here between both
life being under never day same another know while last might us great old year off come
since against go came right used take three states himself few house use during without again
place american around however home small found thought went say part once general high upon
school every don does got united left number course war until always away something fact
though water less public put think almost hand enough far took head yet government system
better set told nothing night end why called didn find look going asked later knew point next
program city business give group toward young days let room president side social given
present several order national possible rather second face per among form important often
things looked early white case john become large big need four within felt along children saw
best church ever least power development light thought seemed family interest want members
mind country area others done turned although open god service certain kind problem began
different thing door help sense whole matter perhaps itself york times law human line above
name example action company hands local show whether five history gave today either act feet
across taken past quite anything seen having death week experience body word half really field
am car words already information tell together college shall money period held keep sure
probably free seems real behind cannot miss political air question making office brought whose
special heard major problems ago became federal moment study available known result street
economic boy position reason change south board individual job areas society west close turn
love community true court force full seem am policy music river garden mountain cat dog
""".split()


@dataclasses.dataclass
class InputData(ApiPayload):
    """The model API's request: a prompt and an optional cap on the answer's length."""

    prompt: str
    max_response_tokens: int | None = None

    @classmethod
    def for_test(cls) -> InputData:
        prompt = " ".join(random.choices(WORDS, k=250))
        return cls(prompt=prompt, max_response_tokens=300)

    def generate_payload_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "max_response_tokens": self.max_response_tokens}

    def count_workload(self) -> float:
        return float(count_tokens(self.prompt))


# A stand-in for the model's tokenizer, offline and stdlib-only: words, numbers in groups of
# three digits, punctuation marks and runs of newlines or spaces, with long words counted as
# several pieces, the way byte-pair encodings split rare words. Measured against GPT-2/GPT-3's
# BPE (r50k) it gives 0.94-1.03 times the BPE count on English prose (the Zen of Python, 200
# stdlib docstrings, this project's spec) and on for_test() prompts.
_PIECES = re.compile(r"[A-Za-z]+|[0-9]{1,3}|[^\sA-Za-z0-9]|\n+| {2,}")
_LONG_WORDS = re.compile(r"[A-Za-z]{9,}")


def count_tokens(text: str) -> int:
    count = len(_PIECES.findall(text))
    for word in _LONG_WORDS.findall(text):
        count += (len(word) - 3) // 6  # a word of 9 letters or more is 2+ tokens
    return count


# 2. The handlers: one per model route ############################################################
# A handler names the model's route; the payload class comes from the brackets. The model's
# answer is relayed as it is: JSON read whole, or a stream chunk by chunk as the tokens come.
# (Override generate_client_response(client_request, model_response) to change the answer.)


class GenerateHandler(EndpointHandler[InputData]):
    """POST /generate: the model answers JSON."""

    endpoint = "/generate"


class GenerateStreamHandler(EndpointHandler[InputData]):
    """POST /generate_stream: the same payload; the model streams one token per chunk."""

    endpoint = "/generate_stream"


# 3. The backend and the model log's meaning ######################################################

backend = Backend(
    model_server_url=MODEL_SERVER_URL,
    model_log_file=None,  # taken from MODEL_LOG
    allow_parallel_requests=True,
    benchmark_handler=GenerateHandler(),
    healthcheck_endpoint=None,  # the model's health route (GET), e.g. "/health", to poll it
    log_actions=[
        (LogAction.ModelLoaded, "infer server has started"),
        (LogAction.ModelError, "Exception: corrupted model file"),
        (LogAction.Info, '"message":"Download'),
    ],
)

# 4. The routes ###################################################################################

routes = [
    post("/generate", backend.create_handler(GenerateHandler())),
    post("/generate_stream", backend.create_handler(GenerateStreamHandler())),
]

if __name__ == "__main__":
    pyworker.run(backend, routes)

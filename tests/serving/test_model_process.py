"""The model in its own process: frames, answers equal to in-process runs, refusals, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from serving.bundle import BundleError
from serving.model_process import (
    ModelProcess,
    ModelProcessError,
    ModelSpec,
    ModelThread,
    decode_answers,
    decode_rows,
    encode_answers,
    encode_rows,
)
from serving.runtime import OnnxModel, Ranked, Row
from tests.serving_support import write_foreign_model

ROWS = [
    Row(np.array([5, 6, 7]), 3, True),
    Row(np.array([9]), 10, False, np.array([4, 8]), np.array([1, 2, 3, 4, 5])),
    Row(np.arange(1, 40), 5, True, candidates=np.zeros(0, np.int64)),  # newest 20 count
]
BLOCKED = np.array([11, 12], dtype=np.int64)


def spec_for(model_file: Path) -> ModelSpec:
    return ModelSpec(
        path=str(model_file),
        num_items=200,
        intra_op_threads=1,
        inter_op_threads=1,
        max_history=20,
        warm_batch=4,
        warm_history=20,
    )


def test_frames_round_trip() -> None:
    decoded, blocked = decode_rows(encode_rows(ROWS, BLOCKED))

    def fields(row: Row) -> tuple:
        cands = None if row.candidates is None else list(row.candidates)
        return list(row.history), row.k, row.exclude_seen, list(row.exclude), cands

    assert [fields(r) for r in decoded] == [fields(r) for r in ROWS]
    assert blocked.tolist() == BLOCKED.tolist()
    answers = [
        Ranked(ids=np.array([3, 1], dtype=np.int64), scores=np.array([0.5, -1.0], np.float32)),
        Ranked(ids=np.zeros(0, np.int64), scores=np.zeros(0, np.float32)),  # all scores dropped
        Ranked(ids=np.array([7], dtype=np.int64), scores=np.array([2.0], np.float32)),
    ]
    for got, sent in zip(decode_answers(encode_answers(answers)), answers, strict=True):
        np.testing.assert_array_equal(got.ids, sent.ids)
        np.testing.assert_array_equal(got.scores, sent.scores)
    with pytest.raises(ValueError, match="malformed batch frame"):
        decode_rows(encode_rows(ROWS, BLOCKED)[:-8])  # one id short
    with pytest.raises(ModelProcessError, match="malformed answer frame"):
        decode_answers(encode_answers(answers)[:-4])


def assert_same_answers(got: list[Ranked], expected: list[Ranked]) -> None:
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_process_and_thread_answer_like_the_model_in_process(serving_bundle: Path) -> None:
    model_file = serving_bundle / "model.onnx"
    expected = OnnxModel(model_file, 200, 1, 1, max_history=20).run(ROWS)

    async def scenario() -> None:
        child = ModelProcess(spec_for(model_file))
        for runner in (child, ModelThread(spec_for(model_file))):
            await runner.start()
            try:
                assert_same_answers(await runner.run(ROWS), expected)
                # Batches sent while others compute are answered in order, each its own.
                answers = await asyncio.gather(*(runner.run(ROWS[i:]) for i in range(3)))
                for i, answer in enumerate(answers):
                    assert_same_answers(answer, expected[i:])
            finally:
                await runner.close()
        assert child.exited  # closing the socket ends the child

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_model_the_child_refuses_is_a_bundle_error(tmp_path: Path) -> None:
    other = write_foreign_model(tmp_path / "other.onnx")

    async def scenario() -> ModelProcess:
        runner = ModelProcess(spec_for(other))
        with pytest.raises(BundleError, match="do not match the bundle contract"):
            await runner.start()
        return runner

    runner = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert runner.exited  # no child is left behind


def test_a_child_that_dies_fails_its_batch_and_is_replaced(serving_bundle: Path) -> None:
    model_file = serving_bundle / "model.onnx"
    expected = OnnxModel(model_file, 200, 1, 1, max_history=20).run(ROWS)

    async def scenario() -> None:
        runner = ModelProcess(spec_for(model_file))
        await runner.start()
        try:
            first = runner.pid
            assert first is not None
            # Killed while it holds a batch: that batch fails with ModelProcessError (a 503).
            os.kill(first, signal.SIGSTOP)
            batch = asyncio.create_task(runner.run(ROWS))
            await asyncio.sleep(0.2)
            os.kill(first, signal.SIGKILL)
            with pytest.raises(ModelProcessError, match="model process failed"):
                await batch
            # The next batch starts a new child and is answered.
            assert_same_answers(await runner.run(ROWS), expected)
            second = runner.pid
            assert second not in (None, first)
            # Killed between batches: replaced before the next batch, which succeeds.
            assert second is not None
            os.kill(second, signal.SIGKILL)
            while not runner.exited:
                await asyncio.sleep(0.02)
            assert_same_answers(await runner.run(ROWS), expected)
            assert runner.pid not in (first, second)
        finally:
            await runner.close()
        assert runner.exited

    asyncio.run(asyncio.wait_for(scenario(), 120))

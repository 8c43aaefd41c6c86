"""The async engine: streaming outputs across threads, abort by leaving, clean shutdown."""

from __future__ import annotations

import asyncio

import pytest

from unmask.engine.async_engine import AsyncEngine
from unmask.engine.client import GroupMember
from unmask.engine.config import EngineConfig
from unmask.engine.errors import EngineDeadError, QueueFullError
from unmask.engine.llm import LLM
from unmask.engine.outputs import FinishReason
from unmask.engine.params import ParamError, SamplingParams

PROMPT = "What is 12 plus 30?"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def _started(model_dir, **config) -> AsyncEngine:
    engine = AsyncEngine(EngineConfig(model_dir=str(model_dir), kv_cache_memory=4 * 2**20, **config))
    await engine.start()
    return engine


def test_streamed_deltas_concatenate_to_the_offline_text(llada_dir):
    params = SamplingParams(max_tokens=48, block_length=16, seed=2, stream_blocks=True)
    expected = LLM(str(llada_dir)).generate(PROMPT, params)[0]

    async def go():
        engine = await _started(llada_dir)
        outs = [o async for o in await engine.add_request("r1", PROMPT, params)]
        await engine.shutdown()
        return outs, engine

    outs, engine = run(go())
    assert "".join(o.delta_text for o in outs) == expected.text == outs[-1].text
    assert outs[-1].finished and outs[-1].finish_reason is expected.finish_reason
    # one output per denoising step when blocks are streamed; masks fall to zero in each block
    assert len(outs) == expected.stats.forward_passes
    for block in range(3):
        masks = [o.block.num_masked for o in outs if o.block.index == block]
        assert masks == sorted(masks, reverse=True) and masks[-1] == 0
    assert not engine.is_alive


def test_concurrent_requests_all_finish_and_pages_return(llada_dir):
    async def go():
        engine = await _started(llada_dir, max_num_seqs=3)

        async def one(i):
            p = SamplingParams(max_tokens=16 + 8 * i, block_length=8, cache=("none", "prefix", "dual")[i % 3])
            return [o async for o in await engine.add_request(f"r{i}", PROMPT, p)][-1]

        finals = await asyncio.gather(*(one(i) for i in range(8)))
        free = engine.kv_pages_free
        await engine.shutdown()
        return finals, free, engine.kv_pages_total

    finals, free, total = run(go())
    assert all(f.finished and f.finish_reason is FinishReason.LENGTH for f in finals)
    assert free == total


def test_leaving_the_stream_early_aborts_and_frees_pages(llada_dir):
    async def go():
        engine = await _started(llada_dir)
        params = SamplingParams(max_tokens=256, block_length=8, stream_blocks=True)
        stream = await engine.add_request("r", PROMPT, params)
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if engine.kv_pages_free == engine.kv_pages_total and engine.num_running == 0:
                break
            await asyncio.sleep(0.05)
        state = engine.kv_pages_free, engine.kv_pages_total, engine.num_running
        await engine.shutdown()
        return state

    free, total, running = run(go())
    assert free == total and running == 0


def test_invalid_requests_raise_before_streaming(llada_dir):
    async def go():
        engine = await _started(llada_dir, max_waiting=1)
        with pytest.raises(ParamError):
            await engine.add_request("bad", PROMPT, SamplingParams(max_tokens=8, cache="nope"))
        streams = []
        with pytest.raises(QueueFullError):
            for i in range(50):  # the first requests may already have been admitted
                streams.append(await engine.add_request(f"x{i}", PROMPT, SamplingParams(max_tokens=512)))
        for stream in streams:  # closing unread streams aborts their requests
            await stream.aclose()
        for _ in range(100):
            if engine.kv_pages_free == engine.kv_pages_total and engine.num_waiting == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.kv_pages_free == engine.kv_pages_total and engine.num_waiting == 0
        await engine.shutdown(drain=False)
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", PROMPT, SamplingParams(max_tokens=8))

    run(go())


# --- request groups: one output stream per group ----------------------------------------------------


async def _until(predicate, seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def _members(*max_tokens: int, ignore_eos: bool = False, group: str = "g") -> list[GroupMember]:
    return [
        GroupMember(f"{group}-{i}", PROMPT, SamplingParams(max_tokens=n, block_length=8, seed=i, ignore_eos=ignore_eos))
        for i, n in enumerate(max_tokens)
    ]


def test_a_groups_outputs_arrive_on_one_stream_until_every_member_has_finished(llada_dir):
    members = _members(8, 24, 16)
    llm = LLM(str(llada_dir))
    expected = [llm.generate(m.prompt, m.params)[0].text for m in members]

    async def go():
        engine = await _started(llada_dir)
        outputs = [item async for item in await engine.add_group(members)]
        await engine.shutdown()
        return outputs

    outputs = run(go())
    finals = {index: out for index, out in outputs if out.finished}
    assert sorted(finals) == [0, 1, 2] and outputs[-1][1].finished  # the stream ends with the last final output
    assert all(out.request_id == members[index].request_id for index, out in outputs)
    for index, text in enumerate(expected):
        assert "".join(out.delta_text for i, out in outputs if i == index) == finals[index].text == text


def test_closing_a_group_stream_aborts_every_member_and_frees_their_pages(llada_dir):
    async def go():
        engine = await _started(llada_dir)
        stream = await engine.add_group(_members(128, 128, 128, ignore_eos=True))
        await stream.__anext__()  # the group is running
        held = engine.kv_pages_free < engine.kv_pages_total
        stream.close()
        freed = await _until(lambda: engine.kv_pages_free == engine.kv_pages_total and engine.num_running == 0)
        channels = dict(engine._channels)
        await engine.shutdown()
        return held, freed, channels

    held, freed, channels = run(go())
    assert held and freed and not channels


def test_a_group_is_queued_whole_or_not_at_all(llada_dir):
    async def go():
        engine = await _started(llada_dir, max_waiting=2)
        with pytest.raises(QueueFullError):
            await engine.add_group(_members(8, 8, 8))
        state = engine.num_waiting, engine.num_running, dict(engine._channels)
        await engine.shutdown()
        return state

    assert run(go()) == (0, 0, {})


def test_after_the_drain_deadline_open_requests_end_with_engine_dead_error(llada_dir):
    async def go():
        engine = await _started(llada_dir, max_num_seqs=1)
        running = await engine.add_group(_members(512, ignore_eos=True))
        await running.__anext__()
        queued = await engine.add_group(_members(8, group="q"))  # waits for the one sequence slot
        engine.begin_drain(timeout=0.5)
        errors = []
        for stream in (running, queued):
            with pytest.raises(EngineDeadError) as caught:
                async for _ in stream:
                    pass
            errors.append(str(caught.value))
        freed = await _until(lambda: engine.kv_pages_free == engine.kv_pages_total and not engine.engine.has_unfinished)
        await engine.shutdown()
        return errors, freed

    errors, freed = run(go())
    assert "shut down" in errors[0] and freed

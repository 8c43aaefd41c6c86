"""The async engine: streaming outputs across threads, abort by leaving, clean shutdown, scoring groups."""

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


async def _read_all(stream) -> list:
    return [out async for out in stream]


def test_the_event_loop_is_woken_once_per_step_however_many_requests_stream(llada_dir):
    """Every step of a full batch has news for each of its requests (stream_blocks), and all of it
    crosses to the event loop in one wake-up; the outputs still reach every request's own stream."""
    params = SamplingParams(max_tokens=16, block_length=8, stream_blocks=True)
    wakeups: list[int] = []
    steps: list[int] = []

    async def go():
        engine = await _started(llada_dir, max_num_seqs=4)
        loop = asyncio.get_running_loop()
        wake = loop.call_soon_threadsafe

        def counted(callback, *args, **kwargs):
            wakeups.append(1)
            return wake(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        engine.add_step_listener(lambda stats: steps.append(stats.batch_size))
        streams = [await engine.add_request(f"r{i}", PROMPT, params) for i in range(4)]
        wakeups.clear()  # from here on, only deliveries wake the loop (adding went through a worker thread)
        steps.clear()
        outputs = await asyncio.gather(*map(_read_all, streams))
        counted_wakeups, counted_steps = len(wakeups), list(steps)
        await engine.shutdown()
        return outputs, counted_wakeups, counted_steps

    outputs, wakeup_count, step_sizes = run(go())
    assert all(outs[-1].finished and len(outs) == outs[-1].stats.forward_passes for outs in outputs)
    assert max(step_sizes) == 4  # the requests shared steps
    # at most one wake-up per step (+1: a step published before the count began may deliver after it)
    assert wakeup_count <= len(step_sizes) + 1 < sum(step_sizes)


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


# --- scoring groups: prompt scores on the engine thread, between steps ------------------------------------

SCORED = [5, 9, 12, 7, 30, 2, 41, 8, 17]
LONG_SCORED = [5 + i % 500 for i in range(1000)]  # with one position per chunk: 999 chunks, seconds of work


async def _scoring_engine(model_dir, **config) -> AsyncEngine:
    """An engine that scores one position per chunk, so a long prompt stays under way for a while."""
    return await _started(model_dir, max_num_batched_tokens=1, **config)


def test_a_scoring_group_streams_each_prompts_scores_once_as_llm_score_computes_them(llada_dir):
    prompts = [SCORED, SCORED[:4], SCORED[3:]]
    expected = LLM(str(llada_dir)).score(prompts, top_logprobs=1)

    async def go():
        engine = await _scoring_engine(llada_dir)
        items = [item async for item in await engine.add_scoring("group", prompts, 1)]
        await engine.shutdown()
        return items

    items = run(go())
    assert sorted(index for index, _ in items) == [0, 1, 2]
    for index, scores in items:
        assert scores.token_ids == expected[index].token_ids
        assert [e.logprob for e in scores.logprobs[1:]] == pytest.approx(
            [e.logprob for e in expected[index].logprobs[1:]], abs=1e-5
        )


def test_a_scoring_group_with_one_prompt_over_the_cap_queues_nothing(llada_dir):
    async def go():
        engine = await _scoring_engine(llada_dir, max_score_tokens=8)
        with pytest.raises(ParamError) as refused:
            await engine.add_scoring("group", [SCORED[:4], SCORED], 0)
        await asyncio.sleep(0.2)  # anything queued would have reached the engine thread by now
        state = refused.value.param, engine._scoring_open, list(engine._scoring)
        await engine.shutdown()
        return state

    assert run(go()) == ("prompt", 0, [])


def test_after_the_drain_deadline_scoring_ends_with_engine_dead_error(llada_dir):
    async def go():
        engine = await _scoring_engine(llada_dir)
        stream = await engine.add_scoring("long", [LONG_SCORED], 0)
        assert await _until(lambda: bool(engine._scoring))
        job = engine._scoring[0].job
        engine.begin_drain(timeout=0.3)
        with pytest.raises(EngineDeadError) as cut:
            async for _ in stream:
                pass
        state = str(cut.value), job.done, engine._scoring_open, list(engine._scoring)
        await engine.shutdown()
        return state

    message, done, still_open, scoring = run(go())
    assert "shutdown timeout" in message
    assert not done and still_open == 0 and scoring == []  # cut, not run to the end


def test_shutdown_waits_for_scoring_under_way_and_refuses_new_scoring(llada_dir):
    async def go():
        engine = await _scoring_engine(llada_dir)
        stream = await engine.add_scoring("under-way", [SCORED * 8], 0)
        shutdown = asyncio.ensure_future(engine.shutdown())
        await asyncio.sleep(0)  # the shutdown has begun: the engine is draining
        with pytest.raises(EngineDeadError):
            await engine.add_scoring("late", [SCORED], 0)
        scored = [item async for item in stream]
        await shutdown
        return scored

    scored = run(go())
    assert len(scored) == 1 and len(scored[0][1].logprobs) == len(SCORED) * 8

"""rbees-orcd's record of what it sent to each worker: prefix keys and longest matches."""

from __future__ import annotations

from rbees_core.orchestrator.prefixes import PROMPT_STEP, PrefixBook, prefix_keys

SYSTEM = {"role": "system", "content": "You keep bees. " * 10}
USER = {"role": "user", "content": "Why hexagons?"}


def test_a_chat_keys_each_cumulative_message_prefix() -> None:
    one = prefix_keys({"messages": [SYSTEM, USER]})
    two = prefix_keys({"messages": [SYSTEM, USER, {"role": "assistant", "content": "Wax."},
                                    {"role": "user", "content": "And?"}]})
    assert [w for _, w in one] == [150, 163]
    assert two[:2] == one and len(two) == 4
    # the tools a chat offers come before its messages
    assert prefix_keys({"messages": [SYSTEM], "tools": [{"type": "function"}]})[0] != one[0]
    assert prefix_keys({}) == prefix_keys(None) == []


def test_a_prompt_is_keyed_at_fixed_boundaries() -> None:
    text = "b" * (2 * PROMPT_STEP + 10)
    keys = prefix_keys({"prompt": text})
    assert [w for _, w in keys] == [PROMPT_STEP, 2 * PROMPT_STEP, 2 * PROMPT_STEP + 10]
    longer = prefix_keys({"prompt": text + "c" * 300})
    assert longer[:2] == keys[:2] and longer[2] != keys[2]


def test_the_longest_match_per_worker() -> None:
    book = PrefixBook()
    turn1 = prefix_keys({"messages": [SYSTEM, USER]})
    other = prefix_keys({"messages": [SYSTEM, {"role": "user", "content": "Hi"}]})
    book.dispatched("p", "a", "job-1", turn1)
    book.dispatched("p", "b", "job-2", other)
    turn2 = prefix_keys({"messages": [SYSTEM, USER, {"role": "assistant", "content": "Wax."}]})
    assert book.matches(turn2) == {"p/a": 163, "p/b": 150}  # b holds the system prompt
    book.forget("p", "a")
    assert book.matches(turn2) == {"p/b": 150}
    book.keep_only(set())
    assert book.matches(turn2) == {} and len(book) == 0


def test_a_worker_remembers_its_last_jobs_only() -> None:
    book = PrefixBook(jobs_per_worker=2)
    keys = [prefix_keys({"prompt": f"job {i} " * 80}) for i in range(3)]
    for i, k in enumerate(keys):
        book.dispatched("p", "a", f"job-{i}", k)
    assert book.matches(keys[0]) == {}
    assert book.matches(keys[2]) == {"p/a": len("job 2 " * 80)}
    # a key two jobs share stays while one of them is remembered
    shared = prefix_keys({"prompt": "x" * PROMPT_STEP + "1"})
    book.dispatched("p", "b", "s1", shared)
    book.dispatched("p", "b", "s2", prefix_keys({"prompt": "x" * PROMPT_STEP + "2"}))
    book.dispatched("p", "b", "s3", prefix_keys({"prompt": "y"}))
    assert book.matches(shared) == {"p/b": PROMPT_STEP}

"""Which checks are planned inline on the event loop (small) and which in a worker thread."""

from guardmerge.serve import service


def test_small_messages_are_inline_and_large_or_unknown_ones_are_not():
    small = [{"role": "user", "content": "hello " * 10}]
    assert service._small(small)
    assert service._small("x" * service.INLINE_CHARS)
    assert not service._small("x" * (service.INLINE_CHARS + 1))
    # the characters are counted across messages and nested parts
    half = "y" * (service.INLINE_CHARS // 2 + 1)
    assert not service._small([{"role": "user", "content": [{"type": "text", "text": half}]},
                               {"role": "assistant", "content": half}])
    # many values, even empty ones, go to the thread
    assert not service._small([{"role": "user", "content": ""}] * service.INLINE_ITEMS)
    # an object whose size is not known cheaply (an SDK object, a generator) goes to the thread
    assert not service._small([object()])
    assert not service._small(iter([{"role": "user", "content": "hi"}]))

"""What `training prepare` and `predict` share: the decoding pool and the label-file lines."""

from __future__ import annotations

import os

import pytest

from model.decode_pool import DecodePool
from model.image_files import LabelFileError, is_image_name, label_lines


def test_label_lines_read_names_with_spaces_skip_comments_and_name_a_bad_line():
    text = "# ground truth\nval/a b.JPEG 3\n\nc.jpg n01440764\n"
    assert label_lines(text, str) == [(2, "val/a b.JPEG", "3"), (4, "c.jpg", "n01440764")]
    with pytest.raises(LabelFileError, match=r"^labels.txt:2: expected '<file> <class index>'"):
        label_lines("a.jpg 1\nlonely\n", lambda number: f"labels.txt:{number}")
    assert is_image_name("x/y.JPEG") and not is_image_name("x/.y.jpg") and not is_image_name("notes.txt")


def _pid_and_square(n: int) -> tuple[int, int]:
    return os.getpid(), n * n


def _fail_on_three(n: int) -> int:
    if n == 3:
        raise ValueError("three")
    return n


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_results_come_in_order_with_a_bounded_window(workers):
    started = []

    def tasks():
        for n in range(20):
            started.append(n)
            yield n

    with DecodePool(workers) as pool:
        results = pool.in_order(_pid_and_square, tasks(), window=3)
        for n, (pid, square) in enumerate(results):
            assert square == n * n
            assert len(started) <= n + 3  # never more than the window read ahead
            assert (pid == os.getpid()) == (workers == 0)  # inline, or in the workers
        with pytest.raises(ValueError, match="three"):
            list(pool.in_order(_fail_on_three, range(5), window=2))  # a task's error reaches the caller

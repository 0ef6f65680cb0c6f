"""service.admission: the bounded places behind /classify's queue-full and /explain's explain-busy."""

import pytest

from service.admission import Admission
from service.metrics import Counter


class Refused(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


def places(limit: int, seconds: float, served_at_once: int = 1) -> tuple[Admission, Counter]:
    rejected = Counter("rejected_total", "refused")
    admission = Admission(
        limit, rejected=rejected, refused=Refused, seconds_per_request=seconds, served_at_once=served_at_once
    )
    return admission, rejected


def test_the_request_past_the_limit_is_refused_and_counted_and_a_place_frees_on_the_answer():
    admission, rejected = places(2, seconds=0.0)
    with admission.hold(), admission.hold():
        assert admission.under_way == 2
        with pytest.raises(Refused), admission.hold():
            pass
    assert rejected.render()[-1] == "rejected_total 1"
    assert admission.under_way == 0
    with admission.hold():  # the places are free again
        assert admission.under_way == 1


def test_a_place_is_freed_when_the_request_fails():
    admission, _ = places(1, seconds=0.0)
    with pytest.raises(ZeroDivisionError), admission.hold():
        1 / 0
    assert admission.under_way == 0


def test_retry_after_is_the_time_the_requests_under_way_take_served_side_by_side():
    admission, _ = places(4, seconds=1.5, served_at_once=2)
    assert admission.retry_after() == 1  # nothing under way: still at least one second
    with admission.hold(), admission.hold(), admission.hold(), admission.hold():
        with pytest.raises(Refused) as refused, admission.hold():
            pass
    assert refused.value.retry_after == 3  # 4 requests × 1.5 s, two at a time
    admission.observe(4.0)  # recent times weigh a fifth: 0.8 × 1.5 + 0.2 × 4
    assert admission.seconds_per_request == pytest.approx(2.0)

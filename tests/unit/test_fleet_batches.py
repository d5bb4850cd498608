"""How --canary/--batch/--max-fail become Ansible's serial and max_fail_percentage, and the batches Ansible makes."""

from __future__ import annotations

import pytest

pytest.importorskip("ansible")

from edgepack.errors import UserError  # noqa: E402
from edgepack.fleet import Batches, plan_batches  # noqa: E402

HOSTS = [f"h{i}" for i in range(10)]


@pytest.mark.parametrize(("batches", "serial", "planned"), [
    (Batches(), [1, "10%"], [[f"h{i}"] for i in range(10)]),  # 10 % of 10 is one host per batch
    (Batches(canary=1, batch="4"), [1, 4], [["h0"], HOSTS[1:5], HOSTS[5:9], ["h9"]]),
    (Batches(canary=2, batch="50%"), [2, "50%"], [HOSTS[:2], HOSTS[2:7], HOSTS[7:]]),
    (Batches(canary=0, batch="100%"), ["100%"], [HOSTS]),
    (Batches(canary=1, batch="25%"), [1, "25%"], [["h0"], HOSTS[1:3], HOSTS[3:5], HOSTS[5:7], HOSTS[7:9],
                                                   ["h9"]]),  # 25 % of 10 rounds down to 2
])
def test_serial_and_the_batches_ansible_makes(batches: Batches, serial: list, planned: list) -> None:
    assert batches.serial() == serial
    assert plan_batches(HOSTS, serial) == planned


def test_max_fail_is_a_percentage_and_bad_values_are_refused() -> None:
    assert Batches(max_fail="5%").max_fail_percentage() == 5.0
    assert Batches(max_fail="49").max_fail_percentage() == 49.0
    for bad in ("150%", "-1", "many"):
        with pytest.raises(UserError, match="--max-fail"):
            Batches(max_fail=bad).max_fail_percentage()
    for bad in ("0", "ten", "-5%"):
        with pytest.raises(UserError, match="--batch"):
            Batches(batch=bad).serial()

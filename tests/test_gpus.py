"""GPU assignment for ``pytest -n K --gpu``: pure functions, no GPU needed."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pytest_vram import cuda_visible, gpus
from pytest_vram.cuda_visible import Stop, Visible
from pytest_vram.gpus import (
    devices_for_worker,
    skip_reason,
    split_devices,
    visible_devices,
    worker_env,
)
from pytest_vram.meters.nvml import nvml_index

UUID_A = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
UUID_B = "GPU-1b2c3d4e-0000-1111-2222-333344445555"
MIG = "MIG-2f8c1e0a-6b4d-5e3f-9a1b-7c6d5e4f3a2b"

# -- cuda_visible.read: the variable as CUDA reads it --------------------------------------


@pytest.mark.parametrize(("count", "devices"), [(None, None), (0, ()), (3, ("0", "1", "2"))])
def test_unset_is_every_gpu_when_the_count_is_known(
    count: int | None, devices: tuple[str, ...] | None
) -> None:
    assert cuda_visible.read(None, count) == Visible(devices)


@pytest.mark.parametrize("value", ["", " ", "\t"])
@pytest.mark.parametrize("count", [None, 4])
def test_set_but_empty_hides_every_gpu(value: str, count: int | None) -> None:
    assert cuda_visible.read(value, count) == Visible(())


@pytest.mark.parametrize(
    ("value", "devices"),
    [
        ("3,1", ("3", "1")),
        (" 02 , 0 ", ("2", "0")),  # leading zeros and spaces do not make another device
        (f"{MIG},1,{UUID_A}", (MIG, "1", UUID_A)),
        ("GPU-8932f937", ("GPU-8932f937",)),  # a UUID prefix, as written
        ("7", ("7",)),  # no count given: an index is taken as written
    ],
)
def test_entries_are_numbered_in_the_lists_order(value: str, devices: tuple[str, ...]) -> None:
    assert cuda_visible.read(value) == Visible(devices)


@pytest.mark.parametrize(
    ("value", "count", "read"),
    [
        ("-1", None, Visible((), Stop.NEGATIVE, "-1")),
        ("0,1,-1,2", None, Visible(("0", "1"), Stop.NEGATIVE, "-1")),
        ("2,-1,junk", None, Visible(("2",), Stop.NEGATIVE, "-1")),
        ("0,gpu1,2", None, Visible(("0",), Stop.MALFORMED, "gpu1")),
        ("0,,1", None, Visible(("0",), Stop.MALFORMED, "")),
        ("1gpu", None, Visible((), Stop.MALFORMED, "1gpu")),
        ("+1", None, Visible((), Stop.MALFORMED, "+1")),
        ("\u00b2", None, Visible((), Stop.MALFORMED, "\u00b2")),  # a digit to str, not to int
        ("GPU-,0", None, Visible((), Stop.MALFORMED, "GPU-")),
        ("0,4,1", 4, Visible(("0",), Stop.BEYOND, "4")),
        ("0", 0, Visible((), Stop.BEYOND, "0")),
    ],
)
def test_cuda_stops_at_the_first_entry_it_cannot_use(
    value: str, count: int | None, read: Visible
) -> None:
    assert cuda_visible.read(value, count) == read


@pytest.mark.parametrize(
    ("value", "twice"), [("1,1", "1"), ("0,1,01", "1"), (f"{UUID_A},2,{UUID_A}", UUID_A)]
)
def test_a_repeated_device_hides_every_gpu(value: str, twice: str) -> None:
    assert cuda_visible.read(value, 4) == Visible((), repeated=twice)


def test_a_repeat_after_the_stop_is_not_read() -> None:
    assert cuda_visible.read("0,-1,0") == Visible(("0",), Stop.NEGATIVE, "-1")


ENTRIES = st.sampled_from(["0", "1", "02", "3", "9", "-1", "x", "", " 1", UUID_A, MIG, "GPU-"])


@given(entries=st.lists(ENTRIES, max_size=5), count=st.integers(0, 4))
def test_the_worker_split_and_the_nvml_lookup_read_the_variable_alike(
    entries: list[str], count: int
) -> None:
    # gpus refuses what CUDA would drop; what it accepts, NVML finds under the same numbers.
    value = ",".join(entries)
    try:
        devices = visible_devices({"CUDA_VISIBLE_DEVICES": value}, count)
    except ValueError:
        return
    for torch_index, device in enumerate(devices):
        assert str(nvml_index(torch_index, value)) == device
    with pytest.raises(ValueError, match="is not visible"):
        nvml_index(len(devices), value)


# -- visible_devices ---------------------------------------------------------------------------


def test_unset_means_every_gpu_of_the_machine() -> None:
    assert visible_devices({}, 4) == ["0", "1", "2", "3"]
    assert visible_devices({"OTHER": "x"}, 0) == []


@pytest.mark.parametrize("value", ["", " ", "  "])
def test_empty_means_no_gpu(value: str) -> None:
    assert visible_devices({"CUDA_VISIBLE_DEVICES": value}, 8) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", ["0"]),
        ("3,1", ["3", "1"]),  # CUDA's order is the list's order
        (" 2 , 0 ", ["2", "0"]),
        ("01,2", ["1", "2"]),
        (f"{UUID_A},{MIG}", [UUID_A, MIG]),
        ("GPU-8932f937", ["GPU-8932f937"]),  # CUDA takes a unique UUID prefix
        (f"1,{UUID_B}", ["1", UUID_B]),
    ],
)
def test_listed_entries_in_order(value: str, expected: list[str]) -> None:
    assert visible_devices({"CUDA_VISIBLE_DEVICES": value}, 4) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("-1", []), ("0,1,-1,2", ["0", "1"]), ("2,-1,junk", ["2"])],
)
def test_negative_entry_ends_the_list_as_in_cuda(value: str, expected: list[str]) -> None:
    assert visible_devices({"CUDA_VISIBLE_DEVICES": value}, 4) == expected


def test_index_beyond_the_machine_names_entry_value_and_count() -> None:
    with pytest.raises(ValueError, match=r"'0,1,7' lists GPU 7, but this machine has 4 GPU\(s\)"):
        visible_devices({"CUDA_VISIBLE_DEVICES": "0,1,7"}, 4)
    with pytest.raises(ValueError, match="lists GPU 0, but this machine has no GPU"):
        visible_devices({"CUDA_VISIBLE_DEVICES": "0"}, 0)


@pytest.mark.parametrize("value", ["0;1", "gpu0", "0,,1", "GPU-", "cuda:0", "+1"])
def test_unparseable_entry_is_named(value: str) -> None:
    with pytest.raises(ValueError, match="neither a GPU index nor a GPU-/MIG- UUID") as info:
        visible_devices({"CUDA_VISIBLE_DEVICES": value}, 4)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("value", "twice"), [("1,1", "1"), ("1,01", "1"), (f"{UUID_A},{UUID_A}", UUID_A)]
)
def test_repeated_gpu_is_an_error(value: str, twice: str) -> None:
    # Two workers handed the same device would not be disjoint.
    with pytest.raises(ValueError, match=f"lists GPU {twice} twice"):
        visible_devices({"CUDA_VISIBLE_DEVICES": value}, 4)


def test_negative_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="GPU count -1 is negative"):
        visible_devices({}, -1)


# -- split_devices -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "workers", "expected"),
    [
        (4, 1, [["0", "1", "2", "3"]]),
        (4, 2, [["0", "1"], ["2", "3"]]),
        (4, 4, [["0"], ["1"], ["2"], ["3"]]),
        (8, 3, [["0", "1", "2"], ["3", "4", "5"], ["6", "7"]]),
        (5, 2, [["0", "1", "2"], ["3", "4"]]),
    ],
)
def test_contiguous_blocks_larger_first(gpus: int, workers: int, expected: list[list[str]]) -> None:
    assert split_devices([str(i) for i in range(gpus)], workers) == expected


@pytest.mark.parametrize(("gpus", "workers"), list(itertools.product(range(1, 11), range(1, 11))))
def test_every_split_is_a_disjoint_cover_with_a_gpu_each(gpus: int, workers: int) -> None:
    visible = [f"{UUID_A[:-2]}{i:02d}" for i in range(gpus)]
    if gpus < workers:
        with pytest.raises(ValueError):
            split_devices(visible, workers)
        return
    blocks = split_devices(visible, workers)
    assert len(blocks) == workers
    assert all(blocks), "every worker gets at least one GPU"
    assert [d for b in blocks for d in b] == visible, "in order, each GPU exactly once"
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_keeps_the_given_order_and_uuids() -> None:
    assert split_devices(["3", UUID_A, "0"], 2) == [["3", UUID_A], ["0"]]


def test_fewer_gpus_than_workers_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"2 GPU\(s\) visible for 4 xdist workers.*-n 2 or fewer"):
        split_devices(["0", "1"], 4)
    with pytest.raises(ValueError, match=r"no GPU visible for 3 xdist worker\(s\)"):
        split_devices([], 3)


@pytest.mark.parametrize("workers", [0, -2])
def test_worker_count_below_one_is_named(workers: int) -> None:
    with pytest.raises(ValueError, match=f"must be >= 1, got {workers}"):
        split_devices(["0"], workers)


def test_repeated_device_is_refused() -> None:
    with pytest.raises(ValueError, match=r"repeats 1"):
        split_devices(["0", "1", "1"], 2)


def test_split_does_not_touch_its_input() -> None:
    visible = ["0", "1", "2"]
    split_devices(visible, 2)[0].append("9")
    assert visible == ["0", "1", "2"]


# -- devices_for_worker ------------------------------------------------------------------------

EIGHT = [str(i) for i in range(8)]


@pytest.mark.parametrize(
    ("worker_id", "expected"),
    [("gw0", ["0", "1"]), ("gw1", ["2", "3"]), ("gw3", ["6", "7"])],
)
def test_each_worker_its_block(worker_id: str, expected: list[str]) -> None:
    assert devices_for_worker(worker_id, EIGHT, 4) == expected


def test_master_keeps_every_visible_gpu() -> None:
    # No xdist (or -n 0): nothing is split, whatever count is passed.
    assert devices_for_worker("master", EIGHT, 4) == EIGHT
    assert devices_for_worker("master", [], 1) == []


def test_replacement_worker_past_the_count_wraps_around() -> None:
    # xdist names the replacement of a crashed worker gw<count + n>.
    assert devices_for_worker("gw4", EIGHT, 4) == devices_for_worker("gw0", EIGHT, 4)
    assert devices_for_worker("gw6", EIGHT, 4) == ["4", "5"]


@pytest.mark.parametrize("worker_id", ["gw", "gwX", "worker1", "GW1", "gw-1", "", "Master"])
def test_bad_worker_id_is_named(worker_id: str) -> None:
    with pytest.raises(ValueError, match=f"worker id {worker_id!r} is neither"):
        devices_for_worker(worker_id, EIGHT, 2)


def test_worker_with_too_few_gpus_errors() -> None:
    with pytest.raises(ValueError, match=r"3 GPU\(s\) visible for 4 xdist workers"):
        devices_for_worker("gw0", ["0", "1", "2"], 4)


# -- worker_env --------------------------------------------------------------------------------


def test_worker_env_sets_its_block() -> None:
    assert worker_env("gw1", 2, {}, 4) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    env = {"CUDA_VISIBLE_DEVICES": f"{UUID_A},{UUID_B},{MIG}"}
    assert worker_env("gw0", 2, env, 8) == {"CUDA_VISIBLE_DEVICES": f"{UUID_A},{UUID_B}"}
    assert worker_env("gw1", 2, env, 8) == {"CUDA_VISIBLE_DEVICES": MIG}


def test_worker_env_splits_within_the_users_selection() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    blocks = [worker_env(f"gw{i}", 4, env, 8)["CUDA_VISIBLE_DEVICES"] for i in range(4)]
    assert blocks == ["4", "5", "6", "7"]


def test_worker_env_round_trips_through_visible_devices() -> None:
    # What a worker sets is what it then sees: the GPUs of its block, in order.
    for workers in range(1, 5):
        seen = []
        for i in range(workers):
            env = worker_env(f"gw{i}", workers, {}, 4)
            seen.extend(visible_devices(env, 4))
        assert seen == ["0", "1", "2", "3"]


def test_master_env_is_left_alone() -> None:
    # Not parsed either: a value CUDA copes with is the user's business outside xdist.
    assert worker_env("master", 1, {"CUDA_VISIBLE_DEVICES": "junk"}, 2) == {}


def test_worker_env_errors_name_the_variable_and_numbers() -> None:
    with pytest.raises(
        ValueError, match=r"pytest -n 4 --gpu: 2 GPU\(s\) visible for 4 xdist workers"
    ) as info:
        worker_env("gw0", 4, {"CUDA_VISIBLE_DEVICES": "1,3"}, 4)
    assert "CUDA_VISIBLE_DEVICES='1,3'" in str(info.value)
    with pytest.raises(ValueError, match=r"CUDA_VISIBLE_DEVICES unset, 1 GPU\(s\) on this machine"):
        worker_env("gw1", 2, {}, 1)
    with pytest.raises(
        ValueError, match=r"no GPU visible for 2 xdist worker\(s\) \(CUDA_VISIBLE_DEVICES=''\)"
    ):
        worker_env("gw0", 2, {"CUDA_VISIBLE_DEVICES": ""}, 4)
    with pytest.raises(ValueError, match="lists GPU 9"):
        worker_env("gw0", 2, {"CUDA_VISIBLE_DEVICES": "0,9"}, 4)


def test_worker_env_rejects_a_bad_worker_id() -> None:
    with pytest.raises(ValueError, match="'node3' is neither"):
        worker_env("node3", 2, {}, 4)


# -- skip_reason -------------------------------------------------------------------------------


@pytest.mark.parametrize(("ranks", "gpus"), [(1, 1), (2, 2), (2, 4), (1, 8)])
def test_enough_gpus_no_skip(ranks: int, gpus: int) -> None:
    assert skip_reason(ranks, [str(i) for i in range(gpus)]) is None


def test_too_few_gpus_says_how_many_of_which() -> None:
    reason = skip_reason(4, ["2", "3"])
    assert reason is not None
    assert reason.startswith("needs 4 GPUs, this xdist worker has 2 (CUDA_VISIBLE_DEVICES='2,3')")
    assert "-n" in reason


def test_reason_names_the_worker_or_the_run() -> None:
    assert skip_reason(2, ["5"], worker_id="gw2") == (
        "needs 2 GPUs, xdist worker gw2 has 1 (CUDA_VISIBLE_DEVICES='5'); "
        "run with fewer xdist workers (-n) so each gets more GPUs"
    )
    assert skip_reason(1, [], worker_id="master") == (
        "needs 1 GPU, this run has 0 (CUDA_VISIBLE_DEVICES=''); make more GPUs visible"
    )


@pytest.mark.parametrize("ranks", [0, -1])
def test_ranks_below_one_is_an_error(ranks: int) -> None:
    with pytest.raises(ValueError, match=f"ranks_needed must be >= 1, got {ranks}"):
        skip_reason(ranks, ["0"])


# -- counting GPUs, and the controller's check of -n -------------------------------------------


def test_a_printed_count_is_the_count() -> None:
    assert gpus.parse_gpu_count(0, "4\n", "") == 4
    assert gpus.parse_gpu_count(0, "a warning first\n0\n", "") == 0


@pytest.mark.parametrize(
    ("code", "out", "err", "detail"),
    [
        (1, "", "Traceback ...\nImportError: libcuda.so.1: cannot open", "ImportError: libcuda"),
        (0, "", "", "exited with 0: no output"),
        (-9, "", "", "exited with -9"),
    ],
)
def test_a_failed_count_is_a_usage_error_not_zero_gpus(
    code: int, out: str, err: str, detail: str
) -> None:
    with pytest.raises(pytest.UsageError, match="could not count the GPUs") as info:
        gpus.parse_gpu_count(code, out, err)
    assert detail in str(info.value)


def test_this_interpreter_counts_without_initialising_cuda() -> None:
    # The real subprocess: on a CPU build it prints 0.
    assert gpus._gpu_count() == torch.cuda.device_count()


def test_more_workers_than_gpus_is_one_error_in_the_controller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gpus, "_gpu_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(pytest.UsageError, match=r"pytest -n 2 --gpu: 1 GPU\(s\) visible for 2"):
        gpus.check_workers(2)
    gpus.check_workers(1)  # one worker, one GPU: fine
    gpus.check_workers(0)  # no xdist: nothing to check, nothing counted
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(pytest.UsageError, match="no GPU visible for 1 xdist worker"):
        gpus.check_workers(1)

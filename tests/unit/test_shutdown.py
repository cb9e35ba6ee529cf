"""How a launched process ends (d2v.train.shutdown): after DDP the gloo process group outlives
``destroy_process_group``, so the command leaves with ``os._exit`` once its output is flushed."""

import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from d2v.train.shutdown import close_process_group, end_command

    class Accelerator:  # the one method close_process_group uses
        def wait_for_everyone(self):
            dist.barrier()

    def gloo_threads():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return sum(name.startswith(("gloo", "pt_gloo")) for name in names)

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
    model(torch.ones(2, 3)).sum().backward()
    del model
    close_process_group(Accelerator(), in_step=True)
    print("gloo threads after destroy_process_group:", gloo_threads())
    sys.stdout.write("unflushed last line")  # no newline: still in the buffer when the process ends
    code = end_command(int(sys.argv[2]))
    print("not reached")
""")


def test_a_command_that_closed_a_process_group_ends_with_its_code_and_all_its_output(tmp_path):
    for code in (0, 3):
        result = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / f"store{code}"), str(code)],
                                capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == code, result.stderr[-2000:]
        lines = result.stdout.splitlines()
        # the reason for the hard exit: torch keeps the DDP process group's threads alive
        assert lines[0].startswith("gloo threads after destroy_process_group:") and int(lines[0].split(":")[1]) > 0
        assert lines[1:] == ["unflushed last line"]


def test_without_a_process_group_the_command_returns_its_code():
    from d2v.train.shutdown import end_command

    assert end_command(0) == 0 and end_command(2) == 2

"""--fast: one training step captured in a CUDA graph and replayed without Python overhead.

Optional and CUDA-only (on a CPU it says so and returns the eager step): the method scripts reach it through
common.fast_step, and their step reads the same with or without it. It needs torch >= 2.4, whose learning-
rate schedulers update a tensor learning rate in place, and a step without host syncs: no .item(), no
tensor-to-number conversion (tests/test_methods.py traces every method's step on the CPU for that).
"""

import sys

import torch
import torch.nn as nn


def make_capturable(optimizer, device):
    """Turn the script's Adam, in place, into the one a graph can replay: fused and capturable, with its
    learning rate a device tensor. The script's scheduler keeps driving it: StepLR fills that tensor in
    place, and the captured graph reads the new rate at its next replay."""
    for group in optimizer.param_groups:
        group.update(lr=torch.tensor(float(group["lr"]), device=device), fused=True, capturable=True, foreach=False)


def capture(step, example_batch, device, state):
    """A replay of `step` captured in a CUDA graph on `device` (on a CPU, `step` itself).

    `step(*batch)` does a whole training step (forward, backward, optimizer step, any EMA) on fixed-shape
    tensors and returns the loss tensor. `state` lists what a step changes (modules, optimizers, tensors).
    Capture needs a few warm-up steps (they allocate gradients and optimizer state); their effect is undone
    in place, the CUDA random number generator included, so the run starts from the same weights and draws
    the same dropout masks and batch orders as the eager run with the same seed. What still differs from
    eager is the optimizer's arithmetic: fused, capturable Adam rounds differently from the default one.
    """
    if device.type != "cuda":
        print("--fast: no CUDA device, so this runs the eager step (the fast path is CUDA-only)", flush=True)
        return step
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        print(
            f"error: --fast needs torch >= 2.4 (its schedulers update a tensor learning rate in place); this is "
            f"torch {torch.__version__}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    optimizers = [s for s in state if isinstance(s, torch.optim.Optimizer)]
    for optimizer in optimizers:
        make_capturable(optimizer, device)
    tensors = [
        t
        for s in state
        if not isinstance(s, torch.optim.Optimizer)
        for t in (s.state_dict().values() if isinstance(s, nn.Module) else [s])
    ]
    saved = [t.detach().clone() for t in tensors]
    rng = torch.cuda.get_rng_state(device)
    static = [b.clone() for b in example_batch]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside capture
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.no_grad():  # undo the warm-up in place; the graph keeps these addresses
        for t, v in zip(tensors, saved):
            t.copy_(v)
        for optimizer in optimizers:
            for st in optimizer.state.values():
                for v in st.values():
                    if torch.is_tensor(v):
                        v.zero_()  # a fresh Adam: zero moments, step 0
    torch.cuda.set_rng_state(rng, device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # the capture stream on the run's device, named: not the current
        static_loss = step(*static)  # device's at torch's first use of it

    def replay(*batch):
        for buf, b in zip(static, batch):
            buf.copy_(b)
        graph.replay()
        return static_loss.clone()

    return replay

"""l2r vs PyTorch eager: the same ResNet-GN SGD step, same weights, in both."""

import jax
import numpy as np

from experiments.bench.common import jax_cores, median_seconds, num_params
from experiments.bench.sgd import sgd_problem


def torch_resnet_gn(depth=32, widths=(16, 32, 64), groups=8, num_classes=10, channels=3):
    """l2r's ResNet-GN backbone plus linear head (`l2r.models.resnet`), in PyTorch, NCHW.

    Layer for layer the same: a 3x3 stem conv + GN + relu; per stage n = (depth - 2) / 6 basic
    blocks (3x3 conv-GN-relu-3x3 conv-GN, plus the shortcut, then relu), the first block of
    every stage after the first with stride 2 and a 1x1 conv + GN projection shortcut
    (identity otherwise); global average pool; a linear head. Convs have no bias; GroupNorm
    has `groups` groups of contiguous channels and eps 1e-5, as in `l2r.models.convnet`.
    Padding is XLA's 'SAME' (`conv.same_padding`): a stride-2 3x3 conv of an even-sized input
    pads (0, 1), not PyTorch's usual (1, 1), so the two nets compute the same function.
    Module names follow l2r's param paths (`copy_to_torch`).

    Returns:
      The `torch.nn.Module`: [N, channels, H, W] float32 images -> [N, num_classes] logits.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    from l2r.models.conv import same_padding
    from l2r.models.resnet import check_depth

    class Conv(nn.Module):
        def __init__(self, cin, cout, kernel, stride):
            super().__init__()
            self.stride = stride
            self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
            nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            k = self.weight.shape[-1]
            (top, bottom), (left, right) = (same_padding(n, k, self.stride) for n in x.shape[2:])
            if top == bottom and left == right:  # Symmetric: padded inside the conv kernel.
                return F.conv2d(x, self.weight, stride=self.stride, padding=(top, left))
            return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, stride=self.stride)

    class Block(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            self.conv1, self.gn1 = Conv(cin, width, 3, stride), nn.GroupNorm(groups, width)
            self.conv2, self.gn2 = Conv(width, width, 3, 1), nn.GroupNorm(groups, width)
            self.project = stride != 1 or cin != width
            if self.project:
                self.shortcut_conv = Conv(cin, width, 1, stride)
                self.shortcut_gn = nn.GroupNorm(groups, width)

        def forward(self, x):
            y = F.relu(self.gn1(self.conv1(x)))
            y = self.gn2(self.conv2(y))
            if self.project:
                x = self.shortcut_gn(self.shortcut_conv(x))
            return F.relu(y + x)

    class ResNetGN(nn.Module):
        def __init__(self):
            super().__init__()
            n = check_depth(depth)
            self.stem_conv = Conv(channels, widths[0], 3, 1)
            self.stem_gn = nn.GroupNorm(groups, widths[0])
            self.blocks = nn.ModuleDict()
            cin = widths[0]
            for s, width in enumerate(widths, start=1):
                for b in range(n):
                    self.blocks[f"stage{s}_block{b}"] = Block(
                        cin, width, 2 if s > 1 and b == 0 else 1
                    )
                    cin = width
            self.head = nn.Linear(widths[-1], num_classes)

        def forward(self, x):
            h = F.relu(self.stem_gn(self.stem_conv(x)))
            for block in self.blocks.values():
                h = block(h)
            return self.head(h.mean(dim=(2, 3)))

    return ResNetGN()


def copy_to_torch(params, net) -> None:
    """Copies l2r's ResNet-GN params {'backbone', 'head'} into `torch_resnet_gn`'s `net`.

    Conv kernels HWIO -> OIHW, the head's kernel [D, K] -> weight [K, D]; GroupNorm scale and
    bias -> weight and bias. Every torch parameter must be written exactly once.

    Raises:
      ValueError: a parameter is missing on either side or has another shape.
    """
    import torch
    from flax import traverse_util

    names = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    torch_params = dict(net.named_parameters())
    written = set()
    with torch.no_grad():
        for path, leaf in traverse_util.flatten_dict(params).items():
            value = np.asarray(leaf)
            if path[0] == "head":
                name = f"head.{names[path[-1]]}"
                value = value.T
            else:  # ("backbone", *layer, leaf): stem_conv, stage1_block0/conv1, ...
                layer = ".".join(path[1:-1])
                name = ("blocks." if path[1].startswith("stage") else "") + f"{layer}."
                name += names[path[-1]]
                if value.ndim == 4:
                    value = value.transpose(3, 2, 0, 1)
            if name not in torch_params or tuple(torch_params[name].shape) != value.shape:
                have = tuple(torch_params[name].shape) if name in torch_params else "no such"
                raise ValueError(f"l2r {'/'.join(path)} {value.shape} -> torch {name}: {have}.")
            torch_params[name].copy_(torch.from_numpy(np.array(value, np.float32)))
            written.add(name)
    if missing := sorted(set(torch_params) - written):
        raise ValueError(f"torch parameters with no l2r counterpart: {missing}.")


def bench_torch(depth, batch, repeats):
    """The same ResNet-GN SGD step (lr 0.1, cross-entropy) in l2r and in PyTorch eager."""
    title = f"ResNet-{depth}-GN SGD step, batch {batch}, 32x32x3"
    try:
        import torch
        from torch.nn import functional as F
    except ImportError:
        print(
            f"\n## {title}: l2r vs PyTorch — skipped, PyTorch is not installed: "
            "`pip install -e '.[bench]'`"
        )
        return
    params, x, y, step = sgd_problem(
        "resnet", dict(depth=depth, widths=(16, 32, 64)), batch, (32, 32, 3), 1
    )
    x, y = x[0], y[0]
    net = torch_resnet_gn(depth)
    copy_to_torch(params, net)  # Same weights, so both take the same steps.
    n_l2r, n_torch = num_params(params), sum(p.numel() for p in net.parameters())
    assert n_l2r == n_torch, f"parameters: l2r {n_l2r}, PyTorch {n_torch}"
    # On an accelerator both run there (cuDNN on either side); on a CPU, on its cores.
    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    net.to(device)
    x_t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(device)  # NHWC->NCHW
    y_t = torch.from_numpy(np.asarray(y).astype(np.int64)).to(device)

    def torch_step():
        loss = F.cross_entropy(net(x_t), y_t)
        net.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(p.grad, alpha=-0.1)
        if gpu:
            torch.cuda.synchronize()  # The kernels run asynchronously: wait for the step.
        return loss.detach()

    threads, cores = torch.get_num_threads(), jax_cores()
    torch.set_num_threads(cores)
    print(f"\n## {title}: l2r vs PyTorch {torch.__version__} eager (steps/s; higher is better)\n")
    threads_note = f"PyTorch threads: {torch.get_num_threads()} (the {cores} cores XLA:CPU uses)"
    where = jax.devices()[0].device_kind if gpu else threads_note
    print(f"Parameters: l2r {n_l2r:,}, PyTorch {n_torch:,}. {where}.\n")
    one = jax.jit(step)
    if gpu:
        l2r_name, eager_name = "l2r: jitted step, XLA:GPU", "PyTorch eager, CUDA (cuDNN convs)"
    else:
        l2r_name = f"l2r: jitted step, XLA:CPU on {cores} cores (canonical convs, NHWC)"
        eager_name = f"PyTorch eager, {cores} threads (NCHW, oneDNN convs: the defaults)"
    rows = {l2r_name: median_seconds(lambda: one(params, (x, y))[0], repeats)}
    rows[eager_name] = median_seconds(torch_step, repeats)
    if cores > 1 and not gpu:
        torch.set_num_threads(1)
        rows["PyTorch eager, 1 thread"] = median_seconds(torch_step, repeats)
    torch.set_num_threads(threads)
    ref = rows[l2r_name]
    print("| implementation | ms/step | steps/s | time vs l2r |")
    print("|---|---|---|---|")
    for name, sec in rows.items():
        print(f"| {name} | {1e3 * sec:.1f} | {1 / sec:.2f} | {sec / ref:.2f}x |")
    print(f"\nPyTorch eager steps/s / l2r steps/s: {ref / rows[eager_name]:.2f}")
    if cores > 1 and not gpu:
        print(
            "\nPyTorch's OpenMP threads wait at barriers by spinning; when other processes hold "
            "the cores they can run many times slower than one thread (the last row). On a busy "
            "machine, compare the 1-thread row too."
        )

"""ONNX's LSTM, GRU and RNN as Relax, one time step after another (TVM's Relax importer has no converter for them).

The sequence length is static after pinning, so the steps are unrolled: the input projection of all steps is one
matmul, each step adds the recurrent one. initial_h / initial_c are ordinary inputs and Y_h / Y_c ordinary outputs,
so a streaming model carries its state between calls by feeding the state outputs back in. sequence_lens masks
the steps at or past each batch row's length: its state stops changing and its Y rows are 0 (in reverse, the
masked steps come first and leave the initial state as it is, which is the spec's per-row reversal).
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgecError

# Activations without parameters; ONNX's parametric ones (Affine, LeakyRelu, HardSigmoid, ...) take
# activation_alpha/beta values whose pairing with the activation list the runtimes do not agree on: refused.
_ACTIVATIONS = ("Sigmoid", "Tanh", "Relu", "Softsign", "Softplus")


def recurrent_converters() -> dict:
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

    def act(bb, name: str, x):
        op = relax.op
        x = bb.normalize(x)
        dt = str(x.ty.dtype)
        one = relax.const(1, dt)
        return {"Sigmoid": lambda: op.sigmoid(x), "Tanh": lambda: op.tanh(x), "Relu": lambda: op.nn.relu(x),
                "Softsign": lambda: op.divide(x, op.add(op.abs(x), one)),
                "Softplus": lambda: op.log(op.add(op.exp(x), one))}[name]()

    def chunks(bb, t, n):               # the gate blocks along the last axis
        parts = bb.emit(relax.op.split(t, n, axis=-1))
        return [bb.emit(relax.TupleGetItem(parts, i)) for i in range(n)]

    class _Recurrent(tvm_onnx.OnnxOpConverter):
        DEFAULT_ACTIVATIONS: tuple = ()
        STATES = 1                      # 1: h; 2: h and c (LSTM)

        @classmethod
        def _impl_v7(cls, bb, inputs, attr, params):
            op = relax.op
            name = attr["tvm_custom"]["name"] or cls.__name__

            def refuse(what, hint="export the model without it"):
                raise EdgecError(f"{cls.__name__} node '{name}' uses {what}, which edgec does not convert", hint)

            x, w, r, b, seq_lens = inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]
            initial = [inputs[5], inputs[6]][:cls.STATES]
            peepholes = inputs[7] if cls.STATES == 2 else None
            direction = attr.get("direction", b"forward")
            direction = direction.decode() if isinstance(direction, bytes) else direction
            dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
            layout, hidden = attr.get("layout", 0), int(attr["hidden_size"])
            acts = [a.decode() if isinstance(a, bytes) else a for a in attr.get("activations", ())]
            acts = acts or list(cls.DEFAULT_ACTIVATIONS) * len(dirs)
            if len(acts) != len(cls.DEFAULT_ACTIVATIONS) * len(dirs):
                refuse(f"{len(acts)} activations for {len(dirs)} direction(s)")
            unknown = sorted({a for a in acts if a not in _ACTIVATIONS})
            if unknown:
                refuse(f"the activation(s) {', '.join(unknown)}",
                       f"edgec converts {', '.join(_ACTIVATIONS)}; export the model with these")
            if attr.get("input_forget", 0):
                refuse("input_forget=1")
            clip = attr.get("clip")
            dt = str(x.ty.dtype)

            if layout:                  # [batch, seq, ...] -> [seq, batch, ...]
                x = bb.emit(op.permute_dims(x, [1, 0, 2]))
                initial = [s if s is None else bb.emit(op.permute_dims(s, [1, 0, 2])) for s in initial]
            steps, batch = (int(d) for d in list(x.ty.shape)[:2])

            def const(v):
                return relax.const(np.asarray(v, dt), dt)

            def take(t, i, axis=0):     # t[i] along axis, that axis dropped
                return bb.emit(op.squeeze(op.strided_slice(t, axes=[axis], begin=[i], end=[i + 1]), axis=[axis]))

            def clipped(t):
                return t if clip is None else op.clip(t, -float(clip), float(clip))

            if seq_lens is not None:
                lens = bb.emit(op.reshape(op.astype(seq_lens, "int64"), (batch, 1)))
            finals, ys = [[] for _ in range(cls.STATES)], []
            for d, reverse in enumerate(dirs):
                n_act = len(cls.DEFAULT_ACTIVATIONS)
                f = acts[d * n_act:(d + 1) * n_act]
                wd, rd = take(w, d), take(r, d)
                # all steps' input projection at once: [seq, batch, gates * hidden]
                xw = bb.emit(op.matmul(x, op.permute_dims(wd, [1, 0])))
                rb = None
                if b is not None:
                    wb, rb = chunks(bb, take(b, d), 2)
                    xw = bb.emit(op.add(xw, wb))
                rt = bb.emit(op.permute_dims(rd, [1, 0]))
                state = [bb.emit(op.zeros((batch, hidden), dt)) if s is None else take(s, d) for s in initial]
                peep = None if peepholes is None else chunks(bb, take(peepholes, d), 3)
                out = [None] * steps
                for t in (reversed(range(steps)) if reverse else range(steps)):
                    new = cls.step(bb, attr, take(xw, t), state, rt, rb, peep, f, clipped, const)
                    if seq_lens is not None:
                        live = bb.emit(op.less(relax.const(t, "int64"), lens))
                        out[t] = bb.emit(op.where(live, new[0], const(0)))
                        new = [bb.emit(op.where(live, n, s)) for n, s in zip(new, state)]
                    else:
                        out[t] = new[0]
                    state = new
                ys.append(bb.emit(op.stack(out, axis=0)))                  # [seq, batch, hidden]
                for i, s in enumerate(state):
                    finals[i].append(s)
            y = bb.emit(op.stack(ys, axis=1))                               # [seq, dirs, batch, hidden]
            finals = [bb.emit(op.stack(s, axis=0)) for s in finals]          # [dirs, batch, hidden]
            if layout:
                y = bb.emit(op.permute_dims(y, [2, 0, 1, 3]))
                finals = [bb.emit(op.permute_dims(s, [1, 0, 2])) for s in finals]
            return relax.Tuple([y, *finals])

        _impl_v14 = _impl_v7

    class LSTM(_Recurrent):
        STATES, DEFAULT_ACTIVATIONS = 2, ("Sigmoid", "Tanh", "Tanh")

        @classmethod
        def step(cls, bb, attr, xw, state, rt, rb, peep, f, clipped, const):
            op = relax.op
            h, c = state
            gates = op.add(xw, op.matmul(h, rt))
            if rb is not None:
                gates = op.add(gates, rb)
            i, o, fg, g = chunks(bb, bb.emit(gates), 4)                     # ONNX's order: i, o, f, c
            if peep is not None:
                pi, po, pf = peep
                i, fg = bb.emit(op.add(i, op.multiply(pi, c))), bb.emit(op.add(fg, op.multiply(pf, c)))
            i, fg, g = act(bb, f[0], clipped(i)), act(bb, f[0], clipped(fg)), act(bb, f[1], clipped(g))
            c = bb.emit(op.add(op.multiply(fg, c), op.multiply(i, g)))
            if peep is not None:
                o = op.add(o, op.multiply(po, c))
            o = act(bb, f[0], clipped(o))
            return [bb.emit(op.multiply(o, act(bb, f[2], c))), c]

    class GRU(_Recurrent):
        DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh")

        @classmethod
        def step(cls, bb, attr, xw, state, rt, rb, peep, f, clipped, const):
            op = relax.op
            (h,) = state
            xz, xr, xh = chunks(bb, xw, 3)
            rz, rr, rh = chunks(bb, rt, 3)
            bz, br, bh = [None] * 3 if rb is None else chunks(bb, rb, 3)

            def plus_bias(t, bias):
                return t if bias is None else op.add(t, bias)

            z = bb.emit(act(bb, f[0], clipped(op.add(xz, plus_bias(op.matmul(h, rz), bz)))))
            reset = bb.emit(act(bb, f[0], clipped(op.add(xr, plus_bias(op.matmul(h, rr), br)))))
            if attr.get("linear_before_reset", 0):
                hh = op.add(xh, op.multiply(reset, plus_bias(op.matmul(h, rh), bh)))
            else:
                hh = op.add(xh, plus_bias(op.matmul(op.multiply(reset, h), rh), bh))
            hh = bb.emit(act(bb, f[1], clipped(hh)))
            return [bb.emit(op.add(op.multiply(op.subtract(const(1), z), hh), op.multiply(z, h)))]

    class RNN(_Recurrent):
        DEFAULT_ACTIVATIONS = ("Tanh",)

        @classmethod
        def step(cls, bb, attr, xw, state, rt, rb, peep, f, clipped, const):
            op = relax.op
            pre = op.add(xw, op.matmul(state[0], rt))
            if rb is not None:
                pre = op.add(pre, rb)
            return [bb.emit(act(bb, f[0], clipped(pre)))]

    return {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}

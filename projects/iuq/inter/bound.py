"""A bound on L_inter's influence (``MODEL.IUQ.INTER.GRAD_BOUND``): issue 30.

Why: against the all-zero target, the focal loss of a negative is linear in its logit once the
logit is large, and its derivative tends to 1 - alpha. When the base model's logits are large on
every pixel (random initialisation, or a bad step of an unstable recipe), every negative fires,
every one of them sends a gradient of the same sign, and at the queries L_inter's gradient is
hundreds of times the base mask loss's: measured on the real SOLOv2 R50 from random
initialisation, 553 vs 2.7 at the kernel head's last conv at step 0 (``studies/
solov2_r50_instability``). Even ramped to 0.5 % of its weight it then drives every kernel's logits
down together, and the masks die for good (the sigmoid is flat there; docs/study.md).

What: per step, the gradient of the (weighted, ramped) ``loss_inter`` and the gradient of the base
model's own losses are measured at the parameters that produce the queries (``params``: the
query head's last layer, ``nearest_parameters``). Where the first is more than ``bound`` times
the second, L_inter's whole gradient (everywhere, not only at those parameters) is scaled by
``bound * |g_base| / |g_inter|``; elsewhere nothing changes. The loss's *value* is never changed
(what is logged and summed is the same number; only backward sees the scale), so a step where the
bound does not bite is exactly the paper's step. It is a per-loss gradient-norm bound as in
multi-task training (GradNorm, Chen et al. 2018, balances such norms; here they are only capped).

``MODEL.IUQ.INTER.GRAD_BOUND_ON "momentum"`` (``MomentumBound``) compares what the optimizer will
move the parameters by instead of this step's gradients. SGD steps along its momentum buffer
``m_t = mu m_(t-1) + g_t``, which is linear in the gradients: it is the sum of L_inter's share and
the base losses' share, each the discounted sum of its own past gradients. Where L_inter pushes the
same way step after step (every kernel's logits down, while the base losses' gradient turns), its
share grows to ~1 / (1 - mu) = 10 times its per-step gradient and the base's does not: a bound
of 0.3 on each step's gradient let it move the kernels by more than the base losses did, and the
masks died (trainable BN, seed 0; docs/study.md). This bound keeps L_inter's share of the momentum
at most ``bound`` times the base's share: per step, the largest ``s`` in [0, 1] with
``|mu m_inter + s g_inter| <= bound |mu m_base + g_base|`` (both shares tracked at ``params``, in
float32; training state, checkpointed). Adam's first moment is the same sum scaled by
``1 - beta1`` on both sides; ``mu`` is read from the optimizer's parameter group.

``MODEL.IUQ.INTER.GRAD_BOUND_MIN_SCALE`` (``lowest``, in [-1, 0]; default 0) lets ``s`` go below 0.
A scale in [0, 1] can only stop adding to L_inter's share, never take it back, and the share
outgrows the bound whenever the base losses' gradient turns (their share then partly cancels, and
L_inter's decays only by ``mu`` a step): on the real SOLOv2 R50 the share was over 3x the bound on
half the steps of every run, and on one the masks died under the push it had built before
(docs/study.md). Below 0, this step's L_inter gradient is applied against itself, as much as the
bound needs and at most ``|lowest|`` times, cancelling part of what the momentum carries: the
loss's value is unchanged; the step climbs L_inter by at most that much.

Framework-independent: torch only.
"""
import torch


def nearest_parameters(tensor, model):
    """The trainable parameters of the layer (a submodule of ``model``) that produces ``tensor``:
    the owner of the first trainable parameter met walking ``tensor``'s autograd graph back from
    it, breadth first (SOLOv2: its kernel head's last conv, weight and bias). [] if ``tensor`` has
    no graph or reaches none of ``model``'s parameters."""
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False) if p.requires_grad}
    frontier, seen, alive = [tensor.grad_fn], set(), []  # alive: no id reused by a freed wrapper
    while frontier:
        following = []
        for node in frontier:
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            alive.append(node)
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None:
                if id(variable) in owner:
                    return [p for p in owner[id(variable)].parameters(recurse=False) if p.requires_grad]
                continue
            following.extend(next_node for next_node, _ in node.next_functions)
        frontier = following
    return []


def _gradient(loss, params):
    """d loss / d params as one flat float32 vector (zeros where it sends no gradient)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if loss.requires_grad \
        else [None] * len(params)
    return torch.cat([(torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()).flatten()
                      for p, g in zip(params, grads)])


def gradient_ratio(loss, reference, params):
    """|d loss / d params| / |d reference / d params| (Frobenius over all of ``params``), without
    touching any ``.grad`` (both graphs are kept for the step's backward). None where the reference
    sends no gradient to ``params``; 0 where ``loss`` sends none."""
    if not params:
        return None
    base_norm = float(_gradient(reference, params).norm())
    if base_norm == 0.0:
        return None
    return float(_gradient(loss, params).norm()) / base_norm


def with_gradient_scale(loss, scale):
    """``loss`` with the same value whose gradient is ``scale`` times its own (scale 1: ``loss``
    itself, the very tensor)."""
    if scale >= 1.0:
        return loss
    return loss * scale + (loss * (1.0 - scale)).detach()


def bound_influence(loss, reference, params, bound):
    """(loss with the same value and a gradient at most ``bound`` times the reference's at
    ``params``, the ratio before the bound or None, the scale applied). ``reference``: the base
    model's summed losses. Where the reference sends no gradient to ``params`` (no query, or the
    base losses do not reach them this step) the loss is left as it is."""
    ratio = gradient_ratio(loss, reference, params)
    scale = 1.0 if ratio is None or ratio <= bound else bound / ratio
    return with_gradient_scale(loss, scale), ratio, scale


def momentum_scale(carried, grad, reference, bound, lowest=0.0):
    """The largest ``s`` in [lowest, 1] with ``|carried + s grad| <= bound |reference|`` (flat
    vectors); where no ``s`` in [lowest, 1] meets it (the share carried from past steps is over the
    bound already, and this step's gradient cannot bring it back), the ``s`` in [lowest, 1] that
    brings ``|carried + s grad|`` nearest to it. 1 where ``grad`` is 0. ``lowest`` <= 0."""
    floor = float(lowest)
    gg = float(grad @ grad)
    if gg == 0.0:
        return 1.0
    ag, aa = float(carried @ grad), float(carried @ carried)
    limit = (bound * float(reference.norm())) ** 2
    if aa + 2.0 * ag + gg <= limit:
        return 1.0
    discriminant = ag * ag - gg * (aa - limit)
    if discriminant >= 0.0:  # the bound holds for s in [smallest, largest]
        smallest, largest = (-ag - discriminant ** 0.5) / gg, (-ag + discriminant ** 0.5) / gg
        if floor <= largest and smallest <= 1.0:
            return min(1.0, largest)  # < 1: s = 1 is over the bound
    return min(1.0, max(floor, -ag / gg))


class MomentumBound:
    """L_inter's share of the optimizer's momentum at ``params`` kept at most ``bound`` times the
    base losses' share (``GRAD_BOUND_ON "momentum"``, above). Call once per step, before backward;
    ``state_dict`` / ``load_state_dict`` carry both shares through checkpoints."""

    def __init__(self, bound, lowest=0.0):
        self.bound = bound
        self.lowest = lowest  # the smallest scale (GRAD_BOUND_MIN_SCALE): below 0 takes back a share
        self.inter = None  # L_inter's share of the momentum at the measured parameters [N], float32
        self.base = None  # the base losses' share [N]

    def __call__(self, loss, reference, params, momentum):
        """(loss with the same value and its gradient scaled by ``s``, the share's ratio before the
        bound ``|mu m_inter + g_inter| / |mu m_base + g_base|`` or None, ``s``). ``momentum``: the
        optimizer's (``mu``; 0 is the per-step bound). Where the base losses have never sent a
        gradient to ``params`` the loss is left as it is (as ``bound_influence``)."""
        if not params:
            return loss, None, 1.0
        grad, base_grad = _gradient(loss, params), _gradient(reference, params)
        if self.inter is None or self.inter.shape != grad.shape:  # first step (or another layer)
            self.inter, self.base = torch.zeros_like(grad), torch.zeros_like(grad)
        self.inter, self.base = self.inter.to(grad.device), self.base.to(grad.device)  # after a load
        carried, base = momentum * self.inter, momentum * self.base + base_grad
        base_norm = float(base.norm())
        ratio = None if base_norm == 0.0 else float((carried + grad).norm()) / base_norm
        scale = 1.0 if ratio is None else momentum_scale(carried, grad, base, self.bound, self.lowest)
        self.inter, self.base = carried + scale * grad, base
        return with_gradient_scale(loss, scale), ratio, scale

    def state_dict(self):
        return {} if self.inter is None else {"inter": self.inter.cpu(), "base": self.base.cpu()}

    def load_state_dict(self, state):
        self.inter, self.base = (state["inter"], state["base"]) if state else (None, None)

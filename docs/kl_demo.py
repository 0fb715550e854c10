"""Exact expected gradients of the GRPO KL terms on a toy categorical policy.

    python docs/kl_demo.py

prints the tables quoted in docs/math.md. Nothing is sampled: every expectation is the
exact sum over the V outcomes (or the V**T outcomes of a T-token toy), weighted by the
sampling policy pi_old, so the numbers carry rounding error only (float64).

The toy: one token position with V outcomes. The parameters are the logits theta (V,);
pi_theta = softmax(theta / temperature). pi_old (the policy that sampled) and pi_ref are
fixed distributions given by their log-probs. A KL "form" is the per-sample term that a
trainer adds to its loss, as a function of l = log pi_theta(y):

    k1 = Delta, k2 = Delta^2 / 2, k3 = rho - 1 + Delta      (Delta = l - l_ref, rho = exp(-Delta))
    "r*kn"    : r * kn with r = exp(l - l_old) differentiable (use_bias_correction_kl)
    "sg(r)*kn": the same with r detached

tests/test_math_demo.py imports these functions from this file and checks the claims of
docs/math.md on fresh random toys. Imports nothing but torch.
"""
import torch

DTYPE = torch.float64
FORMS = ("k1", "k2", "k3", "r*k1", "r*k2", "r*k3", "sg(r)*k3")


def toy_policies(V=5, seed=0, temperature=1.0, off_policy=True, dtype=DTYPE):
    """Random (theta, old_logp, ref_logp) for one token position with V outcomes.

    theta are the trainable logits; old_logp and ref_logp are log-probabilities (V,).
    With off_policy=False, pi_old equals pi_theta in value (the mu = 1 case).
    """
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g, dtype=dtype)
    theta_old = theta + 0.8 * torch.randn(V, generator=g, dtype=dtype)
    theta_ref = theta + 1.0 * torch.randn(V, generator=g, dtype=dtype)
    if not off_policy:
        theta_old = theta.clone()
    old_logp = torch.log_softmax(theta_old / temperature, -1)
    ref_logp = torch.log_softmax(theta_ref / temperature, -1)
    return theta, old_logp, ref_logp


def kl_term(logp, old_logp, ref_logp, form):
    """The per-sample KL term of `form`, elementwise over samples; logp carries the gradient."""
    delta = logp - ref_logp
    k = {"k1": delta, "k2": 0.5 * delta * delta, "k3": torch.exp(-delta) - 1.0 + delta}[form[-2:]]
    if form.startswith("r*"):
        return torch.exp(logp - old_logp) * k
    if form.startswith("sg(r)*"):
        return torch.exp(logp - old_logp).detach() * k
    if form in ("k1", "k2", "k3"):
        return k
    raise ValueError(f"unknown form {form!r}; one of {FORMS}")


def _leaf(theta):
    return theta.detach().clone().requires_grad_(True)


def expected_gradient(theta, old_logp, ref_logp, form, temperature=1.0):
    """E_{y ~ pi_old}[ d kl_term(y) / d theta ] = sum_y pi_old(y) grad_theta term(y), exactly."""
    th = _leaf(theta)
    logp = torch.log_softmax(th / temperature, -1)  # l for every outcome y at once
    weighted = (old_logp.exp() * kl_term(logp, old_logp, ref_logp, form)).sum()
    (grad,) = torch.autograd.grad(weighted, th)
    return grad


def reverse_kl_gradient(theta, ref_logp, temperature=1.0):
    """grad_theta KL(pi_theta || pi_ref) = grad sum_y pi_theta (log pi_theta - log pi_ref), exactly."""
    th = _leaf(theta)
    logp = torch.log_softmax(th / temperature, -1)
    (grad,) = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), th)
    return grad


def forward_kl_gradient(theta, ref_logp, temperature=1.0):
    """grad_theta KL(pi_ref || pi_theta) = -sum_y pi_ref(y) grad log pi_theta(y), exactly."""
    th = _leaf(theta)
    logp = torch.log_softmax(th / temperature, -1)
    (grad,) = torch.autograd.grad((ref_logp.exp() * (ref_logp - logp)).sum(), th)
    return grad


def old_kl_gradient(theta, old_logp, temperature=1.0):
    """grad_theta KL(pi_old || pi_theta): what plain k1 descends, in expectation, off-policy (negated)."""
    return forward_kl_gradient(theta, old_logp, temperature)


def mu1_gradients(theta, y, advantage, temperature=1.0):
    """(autograd's gradient of exp(l - sg(l)) * A, A * grad l) for the sampled token y.

    The first is how TRL writes the mu = 1 policy term (as a loss it is negated; the sign
    does not matter here); the second is the paper's formula, a weighted grad log-prob.
    """
    th = _leaf(theta)
    logp = torch.log_softmax(th / temperature, -1)[y]
    (autograd,) = torch.autograd.grad(torch.exp(logp - logp.detach()) * advantage, th)
    th = _leaf(theta)
    (grad_l,) = torch.autograd.grad(torch.log_softmax(th / temperature, -1)[y], th)
    return autograd, advantage * grad_l


def rank_one_check(theta, y, temperature=1.0):
    """Largest errors of the closed forms  dl/dtheta = (e_y - p)/tau  and  dH/dtheta = p (E_p[z] - z)/tau."""
    th = _leaf(theta)
    z = th / temperature
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    (dl,) = torch.autograd.grad(logp[y], th, retain_graph=True)
    (dh,) = torch.autograd.grad(-(p * logp).sum(), th)
    z, p = z.detach(), p.detach()
    onehot = torch.zeros_like(p)
    onehot[y] = 1.0
    err_l = (dl - (onehot - p) / temperature).abs().max().item()
    err_h = (dh - p * ((p * z).sum() - z) / temperature).abs().max().item()
    return err_l, err_h


# ---- A T-token sequence of independent positions: the KL weight under GSPO -------------

def toy_sequence(T=3, V=5, seed=0, temperature=1.0, off_policy=True, dtype=DTYPE):
    """(theta, old_logp, ref_logp), each (T, V): T independent positions of the toy above."""
    rows = [toy_policies(V, seed * 1000 + t, temperature, off_policy, dtype) for t in range(T)]
    return tuple(torch.stack(parts) for parts in zip(*rows))


def sequence_expected_gradient(theta, old_logp, ref_logp, weight, temperature=1.0):
    """E over whole sequences y ~ pi_old of grad_theta sum_t w_t * k3_t, exactly (V**T outcomes).

    weight: "token" (w_t = r_t, per-token ratio, our default), "sequence" (w_t = s, the GSPO
    ratio exp(mean_t(l_t - l_old_t)), differentiable: TRL 1.16's form) or "none" (plain k3).
    The tokens' losses are summed (aggregation weight 1).
    """
    T, V = theta.shape
    th = _leaf(theta)
    outcomes = torch.cartesian_prod(*[torch.arange(V)] * T).reshape(-1, T)  # (V**T, T)
    pos = torch.arange(T)
    logp = torch.log_softmax(th / temperature, -1)[pos, outcomes]  # (V**T, T)
    old, ref = old_logp[pos, outcomes], ref_logp[pos, outcomes]
    k3 = kl_term(logp, old, ref, "k3")
    if weight == "token":
        w = torch.exp(logp - old)
    elif weight == "sequence":
        w = torch.exp((logp - old).mean(-1, keepdim=True))
    elif weight == "none":
        w = torch.ones_like(k3)
    else:
        raise ValueError(f"weight must be token, sequence or none; got {weight!r}")
    prob_old = old.sum(-1).exp()  # pi_old of the whole sequence
    (grad,) = torch.autograd.grad((prob_old * (w * k3).sum(-1)).sum(), th)
    return grad


def sequence_kl_gradients(theta, ref_logp, temperature=1.0):
    """Per-position exact (reverse, forward) KL gradients, each (T, V)."""
    rev = torch.stack([reverse_kl_gradient(theta[t], ref_logp[t], temperature) for t in range(len(theta))])
    fwd = torch.stack([forward_kl_gradient(theta[t], ref_logp[t], temperature) for t in range(len(theta))])
    return rev, fwd


# ---- printing ----------------------------------------------------------------------------

def _fmt(v):
    return " ".join(f"{x:+.5f}" for x in v.tolist())


def _err(a, b):
    return f"{(a - b).abs().max().item():.1e}"


def main():
    torch.set_printoptions(precision=5)
    V, seed, tau = 5, 0, 1.0
    theta, old_logp, ref_logp = toy_policies(V, seed, tau)
    p = torch.softmax(theta / tau, -1)
    print(f"Toy: V = {V}, seed = {seed}, temperature = {tau}, float64; exact sums over the V outcomes.")
    print(f"pi_theta = {_fmt(p)}")
    print(f"pi_old   = {_fmt(old_logp.exp())}")
    print(f"pi_ref   = {_fmt(ref_logp.exp())}")
    print()
    for title, old in (("Off-policy: y ~ pi_old != pi_theta (mu > 1)", old_logp),
                       ("On-policy: y ~ pi_theta (mu = 1; r == 1 in value, gradient flows)",
                        torch.log_softmax(theta / tau, -1))):
        rev = reverse_kl_gradient(theta, ref_logp, tau)
        fwd = forward_kl_gradient(theta, ref_logp, tau)
        print(title)
        print()
        print("| gradient w.r.t. theta | components | max diff to grad KL(pi_theta‖pi_ref) "
              "| max diff to grad KL(pi_ref‖pi_theta) |")
        print("|---|---|---|---|")
        print(f"| exact grad KL(pi_theta‖pi_ref) | {_fmt(rev)} | 0 | {_err(rev, fwd)} |")
        print(f"| exact grad KL(pi_ref‖pi_theta) | {_fmt(fwd)} | {_err(fwd, rev)} | 0 |")
        for form in FORMS:
            g = expected_gradient(theta, old, ref_logp, form, tau)
            print(f"| E[grad {form}] | {_fmt(g)} | {_err(g, rev)} | {_err(g, fwd)} |")
        if old is old_logp:
            print(f"| -grad KL(pi_old‖pi_theta) | {_fmt(-old_kl_gradient(theta, old_logp, tau))} | | |")
        print()

    T = 3
    th_s, old_s, ref_s = toy_sequence(T, V, seed, tau)
    rev_s, fwd_s = sequence_kl_gradients(th_s, ref_s, tau)
    mix = (1 - 1 / T) * fwd_s + rev_s / T
    print(f"GSPO toy: T = {T} independent positions, V = {V} ({V ** T} sequences), KL weight on k3.")
    print("Entries: largest |difference| over all T x V components.")
    print()
    print("| sampling | weight | to sum_t grad KL(pi_theta‖pi_ref) | to sum_t grad KL(pi_ref‖pi_theta) "
          "| to (1-1/T) fwd + (1/T) rev |")
    print("|---|---|---|---|---|")
    for sampling, old in (("on-policy", torch.log_softmax(th_s / tau, -1)), ("off-policy", old_s)):
        for weight, name in (("token", "per-token r_t (ours)"), ("sequence", "sequence s (TRL 1.16)"),
                             ("none", "none (plain k3)")):
            g = sequence_expected_gradient(th_s, old, ref_s, weight, tau)
            print(f"| {sampling} | {name} | {_err(g, rev_s)} | {_err(g, fwd_s)} | {_err(g, mix)} |")
    print()

    y, adv = 2, -0.7
    auto, paper = mu1_gradients(theta, y, adv, tau)
    err_l, err_h = rank_one_check(theta, y, 0.7)
    print(f"mu = 1: grad of exp(l - sg(l)) * A = {_fmt(auto)}")
    print(f"        A * grad l                 = {_fmt(paper)}   (max diff {_err(auto, paper)})")
    print(f"Closed forms at temperature 0.7: dl/dtheta max error {err_l:.1e}, dH/dtheta max error {err_h:.1e}")


if __name__ == "__main__":
    main()

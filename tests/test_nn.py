import torch

from advcli.nn import Encoder, represent_z, straight_through


def test_straight_through_forward_is_binary_and_gradient_is_sigmoids():
    logits = torch.tensor([-2.0, -0.1, 0.3, 4.0], requires_grad=True)
    probs = torch.sigmoid(logits)
    z = straight_through(probs)
    assert torch.equal(z.detach(), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (z * weights).sum().backward()
    expected = weights * probs.detach() * (1 - probs.detach())
    assert torch.allclose(logits.grad, expected)


def test_represent_z_types():
    logits = torch.tensor([[-3.0], [3.0]])
    assert torch.allclose(represent_z(logits, "soft", 1.0, True), torch.sigmoid(logits))
    assert torch.equal(represent_z(logits, "binary", 1.0, False), torch.tensor([[0.0], [1.0]]))
    # Gumbel: noise while training, deterministic at prediction; low temperature sharpens.
    torch.manual_seed(0)
    a = represent_z(logits.repeat(100, 1), "gumbel", 1.0, True)
    assert a.std() > 0 and ((a > 0) & (a < 1)).all()
    sharp = represent_z(logits, "gumbel", 0.1, False)
    assert torch.allclose(sharp, torch.sigmoid(logits / 0.1))


def test_encoder_dropout_acts_in_training_only():
    torch.manual_seed(0)
    encoder, x = Encoder(20, 4, 16, dropout=0.5), torch.rand(8, 20)
    encoder.train()
    assert not torch.allclose(encoder(x)[0], encoder(x)[0])
    encoder.eval()
    assert torch.equal(encoder(x)[0], encoder(x)[0])

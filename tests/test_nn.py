import pytest
import torch

from advcli.nn import Decoder, Encoder, MinibatchNorm, hidden_norm, represent_z, straight_through


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


def test_batch_norm_couples_a_cell_to_its_minibatch_and_layer_norm_does_not():
    torch.manual_seed(0)
    x = torch.rand(8, 20)
    for norm, coupled in (("layer", False), ("batch", True)):
        encoder = Encoder(20, 4, 16, norm=norm).train()
        alone = encoder(x[:4])[0]
        with_others = encoder(torch.cat([x[:4], 5 * x[4:]]))[0][:4]
        assert torch.allclose(alone, with_others) is not coupled


def test_batch_norm_uses_running_statistics_at_inference_and_for_tiny_groups():
    torch.manual_seed(0)
    norm = MinibatchNorm(6).train()
    for _ in range(50):
        norm(3.0 + 2.0 * torch.randn(64, 6))
    assert torch.allclose(norm.running_mean, torch.full((6,), 3.0), atol=0.3)
    cell = torch.full((1, 6), 5.0)
    want = (cell - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(norm(cell), want)  # one cell in training: no error, no update
    torch.testing.assert_close(norm(cell.repeat(2, 1))[:1], want)
    torch.testing.assert_close(norm.eval()(cell), want)
    decoder = Decoder(4, 10, 16, "nb", n_conditions=2, norm="batch").train()
    assert decoder(torch.randn(1, 4), torch.tensor([1])).shape == (1, 10)


def test_unknown_normalisation_is_refused():
    assert isinstance(hidden_norm("layer", 5), torch.nn.LayerNorm)
    assert isinstance(hidden_norm("none", 5), torch.nn.Identity)
    with pytest.raises(ValueError, match="layer, batch or none"):
        hidden_norm("group", 5)


def test_layer_first_normalises_only_the_decoders_first_hidden_layer():
    for layers in (1, 2, 3):
        decoder = Decoder(4, 10, 16, "nb", n_conditions=2, layers=layers, norm="layer-first")
        kinds = [type(m) for m in decoder.hidden]
        assert kinds[:3] == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.ReLU]
        assert kinds.count(torch.nn.LayerNorm) == 1 and kinds.count(torch.nn.Linear) == layers
    # the layers after the first are not normalised: each cell's hidden units keep their scale
    assert all(isinstance(decoder.hidden[i], torch.nn.Identity) for i in (4, 7))
    h = torch.rand(3, 16) + 0.1
    assert torch.allclose(decoder.hidden[4](2 * h), 2 * h)
    with pytest.raises(ValueError, match="layer, batch or none"):
        Encoder(20, 4, 16, norm="layer-first")

#[path = "../torch_link.rs"]
mod torch_link;

fn main() {
    torch_link::link(None);
}

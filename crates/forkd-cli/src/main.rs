fn main() {
    println!("forkd {}", env!("CARGO_PKG_VERSION"));
}

fn main() {
    println!("cip");
}

fn main() {
    println!("zoe-llm");
}
